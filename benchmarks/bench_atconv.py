"""What ATConv buys over attention, measured side by side (paper Fig. 4b,c and Table VIII latency).

Operator level: latency and peak extra memory of ATConv (this package's fast path), the unoptimised
ATConv formulation of Algorithm 1 (project every token, then pool; channels-first grouped conv) and
multi-head SDPA attention, at C channels on square H x W grids.
Model level: forward latency of SiT-XL/2, SiT-ATConv-XL/2 and SiT-Hybrid-XL/2 on 32x32 (256 px) and
64x64 (512 px) latents, same batch, same run.

The variants of one size are timed in one subprocess, interleaved round-robin so that drifts in
machine speed hit them alike; timings are medians of `--repeats` forward passes under
torch.inference_mode after a warm-up pass. Peak memory is measured per variant in a fresh subprocess
(CUDA's max_memory_allocated, or the growth of the peak resident set on CPU) beyond what the inputs
and weights already hold, after a forward on a 2x2 grid has paid the libraries' one-time set-up.

    python benchmarks/bench_atconv.py                                   # CPU defaults, a few minutes
    python benchmarks/bench_atconv.py --device cuda --op-batch 64 --op-sizes 8 16 32 64 128 \
        --model-batch 32 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sit_atconv.io import save_figure, write_json_atomic

OP_VARIANTS = ("atconv", "atconv_unoptimised", "attention")
MODEL_VARIANTS = ("SiT-XL/2", "SiT-ATConv-XL/2", "SiT-Hybrid-XL/2")


def run_group(spec: dict) -> dict:
    """Build every variant of one operator size or model resolution, then time them interleaved
    (round-robin, so drifts in machine speed hit all variants alike). Runs in a subprocess."""
    import torch

    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    fns = {variant: build_case(spec, variant) for variant in spec["variants"]}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {variant: [] for variant in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up (and compilation)
            fn()
        for _ in range(spec["repeats"]):
            for variant, fn in fns.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[variant].append(time.perf_counter() - start)
    return {
        variant: {"ms": 1e3 * statistics.median(ts), "ms_min": 1e3 * min(ts), "ms_all": [1e3 * t for t in ts]}
        for variant, ts in times.items()
    }


def run_memory(spec: dict) -> dict:
    """Peak memory of one forward of a single variant, beyond what its inputs and weights hold: CUDA's
    max_memory_allocated, or the growth of the peak resident set on CPU. A forward on a 2x2 grid first
    pays the one-time set-up of the libraries. Runs in its own subprocess."""
    import torch

    device = torch.device(spec["device"])
    variant = spec["variants"][0]
    fn = build_case(spec, variant)
    with torch.inference_mode():
        build_case(dict(spec, size=2), variant)()  # one-time library set-up (thread pools, kernel caches)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _current_rss_bytes()
            fn()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_mib": peak / 2**20}


def build_case(spec: dict, variant: str):
    """A zero-argument callable running one forward of `variant` on fixed random inputs."""
    import torch

    from sit_atconv.models import create_model
    from sit_atconv.models.mixers import Attention
    from sit_atconv.ops import ATConv, atconv_reference

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
    if spec["kind"] == "op":
        B, C, S = spec["batch"], spec["channels"], spec["size"]
        x = torch.randn(B, S * S, C, device=device, dtype=dtype)  # (B, N, C) tokens
        module = Attention(C, spec["heads"]) if variant == "attention" else ATConv(C)
        module.to(device, dtype).eval()
        if variant == "atconv_unoptimised":
            fn = lambda: atconv_reference(module, x, (S, S))  # noqa: E731
        else:
            fn = lambda: module(x, (S, S))  # noqa: E731
    else:
        B, S = spec["batch"], spec["size"]
        module = create_model(variant, input_size=S).to(device, dtype).eval()
        x = torch.randn(B, 4, S, S, device=device, dtype=dtype)
        t = torch.rand(B, device=device)
        y = torch.randint(0, 1000, (B,), device=device)
        fn = lambda: module(x, t, y)  # noqa: E731
    return torch.compile(fn) if spec["compile"] else fn


def timing(result: dict, digits: int = 2) -> str:
    """A table cell: median (fastest) in ms."""
    return f"{result['ms']:.{digits}f} ({result['ms_min']:.{digits}f})"


def ratio(slow: dict, fast: dict) -> str:
    """A table cell: ratio of medians (ratio of the fastest runs)."""
    return f"{slow['ms'] / fast['ms']:.2f}x ({slow['ms_min'] / fast['ms_min']:.2f}x)"


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(spec: dict, what: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, f"--{what}", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark case failed: {spec}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_description(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} ({torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def measured_rows(specs: list[dict], variants: tuple[str, ...], memory: bool):
    """For each spec (one size), {variant: timings (+ peak memory)} from interleaved runs in a subprocess."""
    for spec in specs:
        row = measure(spec, "group")
        for variant in variants:
            extra = measure(dict(spec, variants=[variant]), "memory") if memory else {}
            row[variant].update(extra, variant=variant, size=spec["size"])
        yield row


def operator_table(args: argparse.Namespace, common: dict) -> list[dict]:
    """Time and measure every operator variant per grid size; prints the markdown table row by row."""
    print(f"## Operator: B={args.op_batch}, C={args.channels}, attention with {args.heads} heads\n")
    print(
        "| grid | ATConv ms | unoptimised ms | attention ms | unopt./ATConv | attention/ATConv "
        "| ATConv MiB | unopt. MiB | attention MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    spec = dict(common, kind="op", batch=args.op_batch, channels=args.channels, heads=args.heads)
    specs = [dict(spec, size=size, repeats=args.repeats, variants=OP_VARIANTS) for size in args.op_sizes]
    results = []
    for row in measured_rows(specs, OP_VARIANTS, memory=True):
        results.extend(row.values())
        a, u, s = (row[v] for v in OP_VARIANTS)
        print(
            f"| {a['size']}x{a['size']} | {timing(a)} | {timing(u)} | {timing(s)} | {ratio(u, a)} | {ratio(s, a)} "
            f"| {a['peak_mib']:.0f} | {u['peak_mib']:.0f} | {s['peak_mib']:.0f} |",
            flush=True,
        )
    print()
    return results


def model_table(args: argparse.Namespace, common: dict) -> list[dict]:
    """Time the three XL/2 models per latent size; prints the markdown table row by row."""
    print(f"## Model forward: batch {args.model_batch}\n")
    print("| latent (image) | SiT-XL/2 ms | SiT-ATConv-XL/2 ms | SiT-Hybrid-XL/2 ms | SiT/ATConv | SiT/Hybrid |")
    print("|---|---|---|---|---|---|")
    spec = dict(common, kind="model", batch=args.model_batch, repeats=args.model_repeats, variants=MODEL_VARIANTS)
    results = []
    for row in measured_rows([dict(spec, size=size) for size in args.model_sizes], MODEL_VARIANTS, memory=False):
        results.extend(row.values())
        s, a, h = (row[v] for v in MODEL_VARIANTS)
        size = s["size"]
        print(
            f"| {size}x{size} ({size * 8} px) | {timing(s, 0)} | {timing(a, 0)} | {timing(h, 0)} "
            f"| {ratio(s, a)} | {ratio(s, h)} |",
            flush=True,
        )
    print()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--channels", type=int, default=128, help="operator benchmark width C")
    parser.add_argument("--heads", type=int, default=4, help="attention heads in the operator benchmark")
    parser.add_argument("--op-batch", type=int, default=8)
    parser.add_argument("--op-sizes", type=int, nargs="+", default=[8, 16, 32, 64], help="grid sides H = W")
    parser.add_argument("--model-batch", type=int, default=1)
    parser.add_argument("--model-sizes", type=int, nargs="+", default=[32, 64], help="latent sides (32 = 256 px)")
    parser.add_argument("--repeats", type=int, default=25, help="timed passes per operator variant")
    parser.add_argument("--model-repeats", type=int, default=7, help="timed passes per model variant")
    parser.add_argument("--compile", action="store_true", help="torch.compile every case")
    parser.add_argument("--skip-ops", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON and PNG")
    parser.add_argument("--group", help=argparse.SUPPRESS)
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.group or args.memory:
        print(json.dumps(run_group(json.loads(args.group)) if args.group else run_memory(json.loads(args.memory))))
        return

    common = dict(device=args.device, dtype=args.dtype, threads=args.threads, compile=args.compile)
    machine = machine_description(args.device)
    print(f"# ATConv benchmark on {machine}, {args.dtype}{', compiled' if args.compile else ''}\n")
    print("Times: median (fastest) of the interleaved runs, in ms. Ratios: of medians (of the fastest runs).")
    print("Memory: peak growth during one forward beyond inputs and weights.\n")
    results = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "ops": [], "models": []}
    if not args.skip_ops:
        results["ops"] = operator_table(args, common)
    if not args.skip_models:
        results["models"] = model_table(args, common)
    stem = f"atconv_{args.device}_{args.dtype}{'_compiled' if args.compile else ''}"
    write_json_atomic(args.out / f"{stem}.json", results)
    print(f"wrote {args.out / f'{stem}.json'}")
    if results["ops"]:
        plot(results, args.out / f"{stem}.png")


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in OP_VARIANTS:
        rows = [r for r in results["ops"] if r["variant"] == variant]
        sizes = [r["size"] for r in rows]
        ax_t.plot(sizes, [r["ms"] for r in rows], marker="o", label=variant)
        ax_m.plot(sizes, [r["peak_mib"] for r in rows], marker="o", label=variant)
    for ax, label in ((ax_t, "latency (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("grid side (H = W)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(results["machine"], fontsize=8)
    save_figure(fig, path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
