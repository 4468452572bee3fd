// Hand-drawn SVG charts: a line chart with axes and a legend, and a sparkline. Fixed viewBoxes,
// so that nothing around them moves while the numbers change.

const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function ticks(low, high, count = 5) {
  if (high <= low) return [low];
  return Array.from({ length: count }, (_, i) => low + ((high - low) * i) / (count - 1));
}

function format(value) {
  if (value === 0) return "0";
  const abs = Math.abs(value);
  if (abs >= 1000) return value.toFixed(0);
  if (abs < 0.01) return value.toExponential(1);
  return value.toPrecision(3);
}

// `series`: [{name, points: [[x, y], ...], className}]. Returns an <svg>.
export function lineChart(series, { title, xLabel = "iteration", width = 640, height = 260 } = {}) {
  const m = { left: 56, right: 12, top: 24, bottom: 36 };
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img" });
  svg.append(el("title", {}, title ?? series.map((s) => s.name).join(", ")));
  const points = series.flatMap((s) => s.points);
  if (!points.length) {
    svg.append(el("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "muted" }, "no data yet"));
    return svg;
  }
  let [x0, x1] = [Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) {
    const pad = Math.abs(y0) * 0.1 || 1; // a flat series (a constant learning rate) sits mid-chart
    y0 -= pad;
    y1 += pad;
  }
  const X = (v) => m.left + ((v - x0) / (x1 - x0)) * (width - m.left - m.right);
  const Y = (v) => height - m.bottom - ((v - y0) / (y1 - y0)) * (height - m.top - m.bottom);
  for (const v of ticks(y0, y1)) {
    svg.append(el("line", { x1: m.left, x2: width - m.right, y1: Y(v), y2: Y(v), class: "grid" }));
    svg.append(el("text", { x: m.left - 6, y: Y(v) + 4, "text-anchor": "end", class: "tick" }, format(v)));
  }
  for (const v of new Set(ticks(x0, x1).map(Math.round))) {
    svg.append(el("text", { x: X(v), y: height - m.bottom + 16, "text-anchor": "middle", class: "tick" }, String(v)));
  }
  svg.append(el("text", { x: (m.left + width - m.right) / 2, y: height - 4, "text-anchor": "middle", class: "tick" }, xLabel));
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
    svg.append(el("path", { d, class: `line ${s.className ?? `series-${i}`}` }));
    if (s.points.length === 1) {
      const [p] = s.points;
      svg.append(el("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3, class: `dot ${s.className ?? `series-${i}`}` }));
    }
    const ly = m.top + 4 + 14 * i;
    svg.append(el("line", { x1: width - 150, x2: width - 132, y1: ly, y2: ly, class: `line ${s.className ?? `series-${i}`}` }));
    svg.append(el("text", { x: width - 126, y: ly + 4, class: "tick" }, s.name));
  });
  return svg;
}

export function sparkline(values, { width = 120, height = 24 } = {}) {
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, class: "sparkline", "aria-hidden": "true" });
  if (values.length < 2) return svg;
  const low = Math.min(...values);
  const high = Math.max(...values);
  const span = high - low || 1;
  const d = values
    .map((v, i) => `${i ? "L" : "M"}${((i / (values.length - 1)) * width).toFixed(1)},${(height - 2 - ((v - low) / span) * (height - 4)).toFixed(1)}`)
    .join(" ");
  svg.append(el("path", { d, class: "line series-0" }));
  return svg;
}
