#!/usr/bin/env python3
"""Training speed, side by side: the service's own training path, mlx-lm's trainer called
directly, and PyTorch + PEFT (float32, and bfloat16 autocast) on the same data and batches.

    .venv/bin/python scripts/bench_train.py [--rounds 3] [--workloads chat,chat3,text,long] [--engines ...]
    .venv/bin/python scripts/bench_train.py --install-torch   # torch==2.13.0 + peft into .venv-bench/ first

Every run is a fresh process (model loading included in its wall time), the engines alternate
round after round, and the table gives medians. Model: the bundled SmolLM2-135M-Instruct in
float32 (the CPU fast path: OpenBLAS loaded before MLX), rank-8 LoRA (scale 20) on all seven
linear layers of the last 8 blocks, Adam at 1e-5, batches of 4 sorted by length as mlx-lm
builds them. The PyTorch replica uses the same chat template, the same batches in the same
order, the same loss mask and mlx's Adam update rule (no bias correction). PyTorch runs from its
own virtual environment (.venv-bench/, made by --install-torch), as the service's does not hold
it: with torch installed, `transformers` imports it on the service's first tokenizer load too,
and that second of import time would count against the MLX engines.

Engines: service (every speed lever on), service_plain (every lever off: the service's own
overhead over mlx-lm), service_bf16 (service with `cpu_bfloat16`; it fails, saying why, where
that parameter does not apply or pay, as on AMD CPUs), mlx_lm, torch_fp32, torch_bf16.

tokens/s counts the tokens of the samples (the same number for every engine) over the training
time; wall is the whole process, model loading included; peak is the process's maximum RSS
(VmHWM, read by the process itself);
loss is the mean train loss over all steps (mlx-lm's own counts one padding target more per
sample than the others: see tuner/losses.py's masked_loss).

With --against DIR (another checkout of the project, set up), each service engine also runs
from DIR's code, as `ENGINE@DIR`, in the same rounds: the same speed before and after a change.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LEARNING_RATE = 1e-5
RANK, SCALE, LAYERS, BATCH = 8, 20.0, 8, 4
TOPICS = [
    "the moon",
    "bread",
    "rivers",
    "chess",
    "owls",
    "glass",
    "tea",
    "maps",
    "bees",
    "snow",
    "clocks",
    "salt",
    "ships",
    "paper",
    "bridges",
    "violins",
]


def workload(name: str) -> tuple[list, int]:
    """(samples, epochs) of a named workload."""
    if name in ("chat", "chat3"):
        samples = [
            {
                "messages": [
                    {"role": "user", "content": f"Tell me one fact about {topic}, please."},
                    {"role": "assistant", "content": f"Here is one: {topic} appear in stories {i} times."},
                ]
            }
            for i, topic in enumerate(TOPICS * 4)
        ]
        return samples, 3 if name == "chat3" else 1
    if name == "text":
        return [f"Fact {i}: the word {topic} has {len(topic)} letters." for i, topic in enumerate(TOPICS * 4)], 1
    if name == "long":
        filler = " ".join(f"{t} and {u}" for t in TOPICS for u in TOPICS[:10])
        return [f"Story {i}. {filler[i * 7 :]}"[:2400] for i in range(16)], 1
    raise SystemExit(f"unknown workload {name!r}")


# -- engines (each runs in its own process) ----------------------------------------------


def tokenized(model_dir: Path, samples: list) -> list[list[int]]:
    from mlx_lm.utils import load_tokenizer

    from mlx_lora_api.tuner import datasets

    tokenizer = load_tokenizer(model_dir)
    dataset = datasets.build(samples, tokenizer)
    return [dataset[i][0] for i in range(len(dataset))]


def run_service(
    model_dir: Path, samples: list, epochs: int, out: Path, plain: bool = False, bfloat16: bool = False
) -> dict:
    """The service's training job (tasks/finetune.py's train_adapter, as its worker runs it);
    with `plain`, every speed lever off (tuner/levers.py's PLAIN), to measure the service's own overhead
    over mlx-lm's trainer at mlx-lm's settings; with `bfloat16`, the `cpu_bfloat16` parameter
    (the frozen weights' matmuls in bfloat16, as PyTorch's autocast)."""
    import msgspec

    from mlx_lora_api.accel import blas

    blas.prepare()
    from mlx_lora_api.tasks import finetune
    from mlx_lora_api.tuner import levers as switches
    from mlx_lora_api.types import FinetuneRequest

    marks: dict = {}

    def on_event(event):
        if event["type"] == "started":
            marks["start"] = time.perf_counter()
        if event["type"] == "train":
            marks["loss"] = event["train_loss"]
        if event["type"] == "info" and "cpu_bfloat16 does not apply" in event["message"]:
            raise SystemExit(event["message"])  # a float32 run must not be reported as bfloat16
        if event["type"] == "info" and event["message"].startswith("cpu_bfloat16"):
            print(event["message"], file=sys.stderr)  # which matmuls, and what was timed

    parameters = {
        "learning_rate": LEARNING_RATE,
        "epochs": epochs,
        "batch_size": BATCH,
        "rank": RANK,
        "scale": SCALE,
        "num_layers": LAYERS,
        "steps_per_report": 10**6,
        "save_every": 10**6,
        "cpu_bfloat16": bfloat16,
        # Training alone, as the other engines train: no rehearsal rows (the service's default adds
        # half as many again to every batch) and no retention check after it (tasks/finetune.py).
        "rehearsal": 0,
        "retention_check": False,
    }
    request = msgspec.convert(
        {"base_model": "bench", "training_data": samples, "parameters": parameters}, FinetuneRequest
    )
    levers = msgspec.json.decode(os.environ.get("BENCH_LEVERS", "{}"), type=switches.Levers)  # for experiments
    if plain:
        levers = switches.PLAIN
    finetune.train_adapter(str(model_dir), "bench", request, out, on_event, levers=levers)
    return {"train_seconds": time.perf_counter() - marks["start"], "final_loss": marks.get("loss")}


def run_mlx_lm(model_dir: Path, samples: list, epochs: int, out: Path) -> dict:
    """mlx-lm's own `train_model`, as `mlx_lm.lora --train` calls it, on float32 weights."""
    from mlx_lora_api.accel import blas

    blas.prepare()
    import types

    import mlx.core as mx
    from mlx_lm.lora import CONFIG_DEFAULTS, train_model
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import create_dataset
    from mlx_lm.utils import load

    from mlx_lora_api.types import to_records

    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)
    records = to_records(samples)
    iters = epochs * len(records) // BATCH  # workloads are multiples of the batch: nothing dropped
    args = types.SimpleNamespace(
        **{
            **CONFIG_DEFAULTS,
            "model": str(model_dir),
            "train": True,
            "num_layers": LAYERS,
            "batch_size": BATCH,
            "iters": iters,
            "learning_rate": LEARNING_RATE,
            "steps_per_report": iters,
            "steps_per_eval": 10**9,
            "save_every": 10**9,
            "adapter_path": str(out),
            "lora_parameters": {"rank": RANK, "dropout": 0.0, "scale": SCALE},
        }
    )
    config = types.SimpleNamespace(mask_prompt=False)
    train_set = create_dataset(records, tokenizer, config)

    class Marks(TrainingCallback):
        loss = None

        def on_train_loss_report(self, info):
            Marks.loss = info["train_loss"]

    started = time.perf_counter()
    train_model(args, model, train_set, [], Marks())
    return {"train_seconds": time.perf_counter() - started, "final_loss": Marks.loss}


def run_torch(model_dir: Path, data: Path, bf16: bool) -> dict:
    """Runs in .venv-bench: torch, transformers and peft only; the tokens and the batch plan
    come from the parent (`torch_data`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    given = json.loads(data.read_text())
    tokens, plan = given["tokens"], given["plan"]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    layers = model.config.num_hidden_layers
    config = LoraConfig(
        r=RANK,
        lora_alpha=RANK * SCALE,
        lora_dropout=0.0,
        bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers_to_transform=list(range(layers - LAYERS, layers)),
    )
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # mlx's Adam: no bias correction, eps 1e-8, betas (0.9, 0.999)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    losses = []
    started = time.perf_counter()
    for indices in plan:
        batch = [tokens[i] for i in indices]
        width = 1 + 32 * ((max(map(len, batch)) + 31) // 32)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for row, t in enumerate(batch):
            ids[row, : len(t)] = torch.tensor(t)
        lengths = torch.tensor([len(t) for t in batch])
        inputs, targets = ids[:, :-1], ids[:, 1:]
        steps = torch.arange(1, targets.shape[1] + 1)
        mask = (steps[None, :] < lengths[:, None]).float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=inputs).logits
        ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        loss = (ce * mask).sum() / mask.sum()
        loss.backward()
        with torch.no_grad():
            for p, mp, vp in zip(params, m, v):
                mp.mul_(0.9).add_(p.grad, alpha=0.1)
                vp.mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
                p.sub_(LEARNING_RATE * mp / (vp.sqrt() + 1e-8))
                p.grad = None
        losses.append(loss.item())
    return {"train_seconds": time.perf_counter() - started, "final_loss": sum(losses) / len(losses)}


ENGINES = {
    "service": run_service,
    "service_plain": lambda *a: run_service(*a, plain=True),
    "service_bf16": lambda *a: run_service(*a, bfloat16=True),
    "mlx_lm": run_mlx_lm,
    "torch_fp32": None,  # run_torch, in .venv-bench
    "torch_bf16": None,
}
TORCH_VENV = ROOT / ".venv-bench"


def torch_python() -> str | None:
    """The interpreter that has torch and peft: .venv-bench's, else this one's, else None."""
    for python in (TORCH_VENV / "bin" / "python", Path(sys.executable)):
        if (
            python.exists()
            and subprocess.run([python, "-c", "import torch, peft"], capture_output=True).returncode == 0
        ):
            return str(python)
    return None


def install_torch() -> None:
    if not (TORCH_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", TORCH_VENV], check=True)
    subprocess.run([TORCH_VENV / "bin" / "python", "-m", "pip", "install", "-q", "torch==2.13.0", "peft"], check=True)


def torch_data(model_dir: Path, samples: list, epochs: int, path: Path) -> Path:
    """The tokens (our chat template, as the MLX engines see them) and the batch plan, for run_torch."""
    from mlx_lora_api.tuner import datasets

    tokens = tokenized(model_dir, samples)
    plan = datasets.epoch_plan([len(t) for t in tokens], BATCH, epochs, seed=0)
    path.write_text(json.dumps({"tokens": tokens, "plan": plan}))
    return path


# -- the parent: rounds, measurements, table ------------------------------------------------


def sgemm_gflops() -> float:
    code = (
        "from mlx_lora_api.accel import blas; blas.prepare()\n"
        "import mlx.core as mx, time\n"
        "a = mx.random.normal((1024, 1024)); b = mx.random.normal((1024, 1024)); mx.eval(a @ b)\n"
        "t = time.perf_counter()\n"
        "for _ in range(20): mx.eval(a @ b)\n"
        "print(2 * 1024**3 * 20 / (time.perf_counter() - t) / 1e9, blas.describe()['blas_kernels'])\n"
    )
    gflops, kernels = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
    ).stdout.split()
    return float(gflops), kernels


def flops_per_token(model_dir: Path) -> float:
    """Forward through every block and the output layer; backward through the LoRA blocks and
    the output layer (input gradients; LoRA's own are negligible). Attention scores ignored."""
    c = json.loads((model_dir / "config.json").read_text())
    h, f, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads", heads) * c.get("head_dim", h // heads)
    block = 2 * (2 * h * h + 2 * h * kv + 3 * h * f)
    output = 2 * h * c["vocab_size"]
    return c["num_hidden_layers"] * block + output + LAYERS * block + output


def peak_mib() -> float:
    """This process's peak resident memory. Not wait4's ru_maxrss: on Linux a child starts from
    its parent's high-water mark (kept across fork and exec), so every engine would read at
    least the parent's peak."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def run_once(engine: str, model_dir: Path, name: str, python: str, data: Path | None) -> dict:
    """One run in a fresh process; `ENGINE@DIR` runs DIR's own copy of this script and code."""
    engine, _, other = engine.partition("@")
    root = Path(other) if other else ROOT
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        extra = ["--data", str(data)] if data else []
        process = subprocess.Popen(
            [
                python,
                str(root / "scripts" / Path(__file__).name),
                "--child",
                engine,
                "--workload",
                name,
                "--model",
                str(model_dir),
                "--out",
                out,
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=root,
        )
        stdout, stderr = process.communicate()
        wall = time.perf_counter() - started
    if process.returncode != 0:
        last = stderr.strip().splitlines()[-1:] or [""]
        return {"error": f"exit status {process.returncode}: {last[0]}"}
    notes = [line for line in stderr.splitlines() if line.startswith("cpu_bfloat16")]
    return {**json.loads(stdout.strip().splitlines()[-1]), "wall_seconds": wall, "notes": notes}


def machine() -> str:
    cpu = platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="chat,chat3,text,long")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument(
        "--install-torch", action="store_true", help="install torch==2.13.0 and peft into .venv-bench first"
    )
    parser.add_argument("--against", type=Path, help="another checkout: its service engines run beside these")
    parser.add_argument("--plot", type=Path, help="also write the tokens/s per engine as an SVG bar chart here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.child.startswith("torch"):
            result = run_torch(args.model, args.data, bf16=args.child == "torch_bf16")
        else:
            samples, epochs = workload(args.workload)
            result = ENGINES[args.child](args.model, samples, epochs, args.out)
        print(json.dumps({**result, "peak_mib": peak_mib()}))
        return
    if args.install_torch:
        install_torch()
        return

    from mlx_lora_api import registry
    from mlx_lora_api.registry.gguf import register
    from mlx_lora_api.tasks import import_gguf as gguf_import

    engines = args.engines.split(",")
    if args.against:
        engines += [f"{e}@{args.against.resolve()}" for e in engines if e.startswith("service")]
    python_for_torch = torch_python() if any(e.startswith("torch") for e in engines) else None
    if python_for_torch is None:
        skipped = [e for e in engines if e.startswith("torch")]
        engines = [e for e in engines if not e.startswith("torch")]
        if skipped:
            print(f"(PyTorch + PEFT not installed: {', '.join(skipped)} skipped; see --install-torch)")

    data = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model_dir = register(gguf_import.bundled_gguf_path(), registry.Registry(data, "m"), "smollm2")
    roofline, kernels = sgemm_gflops()
    per_token = flops_per_token(model_dir)
    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"float32 sgemm through MLX + OpenBLAS ({kernels} kernels): {roofline:.0f} GFLOP/s; a step costs {per_token / 1e9:.3f} "
        f"GFLOP/token, so the roofline is {roofline * 1e9 / per_token:.0f} tokens/s"
    )
    print()
    chart: dict[str, dict[str, float]] = {}
    overheads: dict[str, float] = {}
    notes: list[str] = []  # what cpu_bfloat16 put in bfloat16, and what it timed
    print("| workload | engine | tokens/s | wall s | peak MiB | mean loss | of roofline | vs service |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.workloads.split(","):
        samples, epochs = workload(name)
        with open(os.devnull, "w"):
            tokens = sum(map(len, tokenized(model_dir, samples))) * epochs
        results: dict[str, list[dict]] = {e: [] for e in engines}
        given = torch_data(model_dir, samples, epochs, data / f"{name}.json") if python_for_torch else None
        for _ in range(args.rounds):
            for engine in engines:
                torch_engine = engine.startswith("torch")
                results[engine].append(
                    run_once(
                        engine,
                        model_dir,
                        name,
                        python_for_torch if torch_engine else sys.executable,
                        given if torch_engine else None,
                    )
                )
        medians = {}
        for engine, runs in results.items():
            good = [r for r in runs if "error" not in r]
            if not good:
                print(f"| {name} | {engine} | failed: {runs[0]['error']} | | | | | |")
                continue
            tps = statistics.median(tokens / r["train_seconds"] for r in good)
            medians[engine] = {
                "tps": tps,
                "wall": statistics.median(r["wall_seconds"] for r in good),
                "peak": statistics.median(r["peak_mib"] for r in good),
                "loss": statistics.median(r["final_loss"] for r in good if r["final_loss"] is not None),
            }
        chart[f"{name} ({epochs} ep)"] = {engine: m["tps"] for engine, m in medians.items()}
        base = medians.get("service")
        for engine, m in medians.items():
            ratio = f"{base['wall'] / m['wall']:.2f}x wall, {m['tps'] / base['tps']:.2f}x tok/s" if base else ""
            print(
                f"| {name} ({epochs} ep, {tokens} tok) | {engine} | {m['tps']:.0f} | {m['wall']:.1f} | {m['peak']:.0f} | "
                f"{m['loss']:.4f} | {m['tps'] * per_token / (roofline * 1e9):.0%} | {ratio} |"
            )
        for engine, runs in results.items():
            notes.extend(f"{name}, {engine}: {n}" for n in dict.fromkeys(n for r in runs for n in r.get("notes", [])))
        if "service_plain" in medians and "mlx_lm" in medians:
            overheads[name] = medians["mlx_lm"]["tps"] / medians["service_plain"]["tps"] - 1
    print(*notes, sep="\n")
    for name, overhead in overheads.items():
        print(
            f"{name}: the service with every lever off trains {overhead:+.1%} slower than mlx-lm's trainer "
            "(tokens/s; negative: faster)"
        )
    if args.plot:
        from mlx_lora_api.web.plots import bars_svg

        args.plot.write_text(
            bars_svg(f"Training tokens/s, SmolLM2-135M, LoRA r8 on 8 blocks ({machine()})", chart, "tok/s")
        )


if __name__ == "__main__":
    main()
