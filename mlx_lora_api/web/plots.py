"""Loss curves as a self-contained SVG (no plotting library needed)."""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT = 640, 360
MARGIN = {"left": 56, "right": 16, "top": 32, "bottom": 40}
COLORS = {"train": "#2563eb", "validation": "#dc2626"}
PALETTE = ["#2563eb", "#16a34a", "#f59e0b", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d"]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    step = (high - low) / (count - 1)
    return [low + i * step for i in range(count)]


def loss_svg(title: str, series: dict[str, list[tuple[float, float]]]) -> str:
    """`series` maps a name (train, validation, or a run's) to (iteration, loss) points."""
    points = [p for values in series.values() for p in values]
    x0, x1 = MARGIN["left"], WIDTH - MARGIN["right"]
    y0, y1 = HEIGHT - MARGIN["bottom"], MARGIN["top"]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}"'
        ' font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>',
    ]
    if not points:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no losses reported yet</text>')
        return "\n".join(parts + ["</svg>"])
    it_low, it_high = min(p[0] for p in points), max(p[0] for p in points)
    loss_low, loss_high = min(p[1] for p in points), max(p[1] for p in points)
    if it_high == it_low:
        it_high = it_low + 1
    if loss_high == loss_low:
        loss_high = loss_low + 1

    def x(it: float) -> float:
        return x0 + (it - it_low) / (it_high - it_low) * (x1 - x0)

    def y(loss: float) -> float:
        return y0 - (loss - loss_low) / (loss_high - loss_low) * (y0 - y1)

    parts.append(f'<path d="M{x0},{y1} V{y0} H{x1}" fill="none" stroke="#444"/>')
    for value in _ticks(loss_low, loss_high):
        parts.append(f'<text x="{x0 - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.3g}</text>')
        parts.append(f'<line x1="{x0}" x2="{x1}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#eee"/>')
    for value in sorted({round(v) for v in _ticks(it_low, it_high)}):
        parts.append(f'<text x="{x(value):.1f}" y="{y0 + 16}" text-anchor="middle">{value:.0f}</text>')
    parts.append(f'<text x="{(x0 + x1) / 2}" y="{HEIGHT - 6}" text-anchor="middle">iteration</text>')
    parts.append(
        f'<text x="14" y="{(y0 + y1) / 2}" transform="rotate(-90 14 {(y0 + y1) / 2})" text-anchor="middle">loss</text>'
    )
    for row, (name, values) in enumerate(series.items()):
        if not values:
            continue
        color = COLORS.get(name, PALETTE[row % len(PALETTE)])
        path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in values)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        if len(values) == 1:
            parts.append(f'<circle cx="{x(values[0][0]):.1f}" cy="{y(values[0][1]):.1f}" r="3" fill="{color}"/>')
        ly = MARGIN["top"] + 14 * row + 8
        lx = x1 - 110 if name in COLORS else x1 - 300  # runs' names are longer
        parts.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{lx + 24}" y="{ly + 4}" class="legend">{escape(name)}</text>')
    return "\n".join(parts + ["</svg>"])


def bars_svg(title: str, groups: dict[str, dict[str, float]], unit: str) -> str:
    """Grouped horizontal bars: {group: {name: value}}, e.g. tokens/s per engine per workload."""
    names = list(dict.fromkeys(n for values in groups.values() for n in values))
    palette = ["#2563eb", "#16a34a", "#f59e0b", "#dc2626", "#7c3aed", "#0891b2"]
    row, gap, left, width = 16, 14, 150, 420
    height = 40 + sum(len(v) * row + gap for v in groups.values()) + 20 * len(names)
    top = max((v for values in groups.values() for v in values.values()), default=1) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" height="{height}"'
        ' font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="10" y="18" font-size="13">{escape(title)}</text>',
    ]
    y = 34
    for group, values in groups.items():
        parts.append(f'<text x="10" y="{y + 12}">{escape(group)}</text>')
        for name, value in values.items():
            color = palette[names.index(name) % len(palette)]
            length = value / top * width
            parts.append(f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{row - 3}" fill="{color}"/>')
            parts.append(f'<text x="{left + length + 4:.1f}" y="{y + 11}">{value:.0f} {escape(unit)}</text>')
            y += row
        y += gap
    for i, name in enumerate(names):
        parts.append(f'<rect x="10" y="{y + 20 * i}" width="12" height="12" fill="{palette[i % len(palette)]}"/>')
        parts.append(f'<text x="28" y="{y + 20 * i + 10}">{escape(name)}</text>')
    return "\n".join(parts + ["</svg>"])
