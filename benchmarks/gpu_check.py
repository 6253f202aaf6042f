"""GPU check (issue 12, section 4): the CUDA tests, ATConv vs SDPA, XL/2 training and sampling throughput.

On one H100/H200 it runs in at most 8 minutes, compile time included (`--quick`: one size, fewer repeats,
about 3 minutes), prints a table per section and writes benchmarks/results/<gpu-name-slug>-<date>.json and
.md (see benchmarks/GPU_CHECK.md). The GPU machine has no network and no project venv, so the packages it
lacks travel as wheels (`make gpu-wheels`):

    pip install --no-index --no-deps --target /tmp/site gpu-wheels/*.whl
    PYTHONPATH=.:/tmp/site python3 benchmarks/gpu_check.py [--quick]

Sections (run in the order 1, 3, 4, 5, 2, so that the time budget, if anything, cuts the ops):
1. tests: `pytest -m cuda tests/test_cuda.py` in a subprocess (pass/fail/skip counts).
2. ops: ATConv vs SDPA at C = 1152, batch 32, 256 / 1024 / 4096 tokens, bf16 weights and inputs; the whole
   mixers (16-head attention with qkv/proj vs the ATConv module) and the core ops (SDPA vs the modulated
   per-sample depthwise conv), forward and forward+backward, each ATConv conv implementation, eager and
   torch.compile'd; time and peak memory beyond the inputs.
3. train: forward + flow-matching loss + backward + AdamW(fused) step of SiT-XL/2, SiT-ATConv-XL/2 and
   SiT-Hybrid-XL/2 at 256 px (batch 32) and 512 px (batch 8), bf16 autocast, eager and compiled (each
   block compiled: one graph per block kind, so 28 blocks cost one compile); images/s, peak memory, MFU.
4. sample: Euler, 50 steps, CFG 1.8, batch 64 at 256 px through `sit_atconv.generation.generate` (bf16
   autocast), images/s; the decode of a random-weight SD-VAE-sized AutoencoderKL timed separately.
5. fsdp: the trainer with train.parallel=ddp and then fsdp (issue 22), one process, SiT-ATConv-XL/2 on 32 px digits
   (256 tokens), batch 32, bf16: steps/s, the state each holds and the peak memory.
Then the issue's targets, each with pass/miss and the margin; for a missed one, the top kernels of its
case from torch.profiler.

Timings: CUDA events around `repeats` calls after warm-up calls, medians. A time budget skips (and records
as skipped) what no longer fits, so a slow machine still ends with results.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = "gpu-wheels"  # `make gpu-wheels` downloads into it (ignored by git)
# Import name -> distribution name, for everything the check imports. Only diffusers and omegaconf (the CUDA
# test of the trainer) are missing on the GPU machine (see benchmarks/GPU_CHECK.md); the others are named so
# that a different machine says what it lacks.
REQUIRED = {
    "torch": "torch",
    "numpy": "numpy",
    "diffusers": "diffusers",
    "omegaconf": "omegaconf",
    "accelerate": "accelerate",
    "timm": "timm",
    "einops": "einops",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
    "PIL": "pillow",
    "pytest": "pytest",
}
MODELS = ("SiT-XL/2", "SiT-ATConv-XL/2", "SiT-Hybrid-XL/2")
BASELINE, ATCONV = MODELS[0], MODELS[1]
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets; matched against
# torch.cuda.get_device_name() in this order (the PCIe H100 before the generic H100, which is the SXM part).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def fail(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr)
    sys.exit(2)


# ------------------------------------------------------------------------------------------------
# Plans: what each mode measures
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    op_channels: int = 1152
    op_heads: int = 16
    op_batch: int = 32
    op_tokens: tuple[int, ...] = (1024, 256, 4096)  # 1024 first: its target must not fall to the budget
    op_passes: tuple[str, ...] = ("fwd", "fwd+bwd")
    train_cases: tuple[tuple[int, int], ...] = ((32, 32), (64, 8))  # (latent side, batch): 256 px and 512 px
    sample_latent: int = 32
    sample_batch: int = 64
    sample_steps: int = 50
    cfg_scale: float = 1.8
    vae: dict = field(
        default_factory=lambda: dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
    )
    model_overrides: dict = field(default_factory=dict)  # e.g. a smaller depth and width for the smoke run
    # Section 5, the trainer with train.parallel ddp and fsdp in one process: (model, digits px, batch, steps).
    fsdp_case: tuple = ("SiT-ATConv-XL/2", 32, 32, 8)  # 32 px at patch 2: the 256 tokens of ImageNet-256
    warmup: int = 3
    repeats: int = 20
    train_repeats: int = 10
    sample_repeats: int = 3
    profile_steps: int = 3
    budget_s: float = 450.0  # leaves ~30 s of the 8 minutes for the case under way and the reports
    tests_timeout_s: float = 240.0
    compile_backend: str = "inductor"
    # The ratio targets are read off the compiled runs (how the models train and sample in practice) when
    # they were measured, else off the eager ones.
    target_mode: str = "compiled"


FULL = Plan()
QUICK = replace(
    FULL,
    op_tokens=(1024,),
    op_passes=("fwd+bwd",),
    train_cases=((32, 32),),
    warmup=2,
    repeats=8,
    train_repeats=5,
    sample_repeats=1,
    profile_steps=2,
    budget_s=165.0,
    tests_timeout_s=120.0,
)
# CPU smoke run: every section end to end at toy sizes in seconds. The "eager" compile backend still runs
# dynamo's tracing, guards and recompile logic, but skips inductor's C++ builds, which take minutes here.
TINY = Plan(
    op_channels=32,
    op_heads=2,
    op_batch=2,
    op_tokens=(16, 64),
    train_cases=((8, 2), (16, 1)),
    fsdp_case=("SiT-ATConv-S/2", 8, 2, 3),
    sample_latent=8,
    sample_batch=2,
    sample_steps=3,
    vae=dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8),
    model_overrides=dict(depth=2, hidden_size=64, num_heads=2, num_classes=10),
    warmup=1,
    repeats=2,
    train_repeats=2,
    sample_repeats=1,
    profile_steps=1,
    budget_s=120.0,
    tests_timeout_s=120.0,
    compile_backend="eager",
)


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------


def pinned_version(distribution: str) -> str | None:
    """The version constraints.txt pins for `distribution` (the one `make gpu-wheels` downloads)."""
    try:
        lines = (REPO / "constraints.txt").read_text().splitlines()
    except OSError:
        return None
    key = distribution.lower().replace("_", "-")
    for line in lines:
        name, _, version = line.partition("==")
        if name.strip().lower().replace("_", "-") == key:
            return version.strip()
    return None


def check_packages() -> None:
    """Import every package the check needs; a missing or broken one stops the run naming its wheel."""
    for module, distribution in REQUIRED.items():
        try:
            importlib.import_module(module)
        except Exception as error:  # ImportError, or a package that breaks at import (e.g. version clash)
            version = pinned_version(distribution)
            wheel = f"{distribution}=={version}" if version else distribution
            fail(
                f"cannot import {module!r} ({type(error).__name__}: {error}). Carry the wheel {wheel}: run "
                f"`make gpu-wheels` where pip reaches PyPI (it downloads the wheels into {WHEEL_DIR}/), then here "
                f"`pip install --no-index --no-deps --target /tmp/site {WHEEL_DIR}/*.whl` and run with "
                "PYTHONPATH=.:/tmp/site (see benchmarks/GPU_CHECK.md)"
            )


def machine_info(device) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
    }
    for name in ("diffusers", "triton"):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception:  # triton is optional on CPU-only installs
            info[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        info["commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):  # the GPU machine's copy may have no git
        info["commit"] = None
    return info


def peak_tflops(gpu: str | None) -> float | None:
    if not gpu:
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in gpu.lower():
            return tflops
    return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


class Run:
    """The state shared by the sections: device, plan, time budget, results, targets."""

    def __init__(self, plan: Plan, device, quick: bool):
        self.plan, self.device, self.quick = plan, device, quick
        self.started = time.perf_counter()
        self.results: dict = {
            "tests": None,
            "ops": [],
            "sdpa_backends": {},
            "train": [],
            "sample": [],
            "vae": None,
            "fsdp": [],
        }
        self.targets: list[dict] = []
        self.skipped: list[str] = []

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def fits(self, what: str) -> bool:
        """False (and `what` recorded as skipped) once the time budget is spent."""
        if self.elapsed() < self.plan.budget_s:
            return True
        self.skipped.append(what)
        print(f"  skipped (time budget of {self.plan.budget_s:.0f} s spent): {what}", flush=True)
        return False

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        """Drop compiled graphs (they hold their modules) and cached blocks between cases."""
        import torch

        torch._dynamo.reset()
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def measure(self, fn, warmup: int, repeats: int) -> dict:
        """Median and fastest ms of `repeats` calls after `warmup` calls (the first one's wall time, which
        holds any compilation, kept apart), and the peak memory they allocated beyond what was allocated
        before (None on CPU)."""
        import torch

        first_s = None
        for i in range(warmup):
            start = time.perf_counter()
            fn()
            self.sync()
            if i == 0:
                first_s = time.perf_counter() - start
        if self.cuda:
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            # Record every event first and synchronise once, so that the GPU's queue never drains between calls.
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)
            ]
            for start, end in events:
                start.record()
                fn()
                end.record()
            self.sync()
            times = [start.elapsed_time(end) for start, end in events]
            peak_mib = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
            peak_total_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - start))
            peak_mib = peak_total_gib = None
        return {
            "ms": statistics.median(times),
            "min_ms": min(times),
            "first_call_s": first_s,
            "peak_mib": peak_mib,
            "peak_total_gib": peak_total_gib,
        }

    def top_kernels(self, fn, rows: int = 10) -> list[dict]:
        """The kernels (CUDA) or operators (CPU) that take the most self time over `profile_steps` calls."""
        from torch.profiler import ProfilerActivity, profile

        fn()  # outside the trace: lazy set-up must not show up as a kernel
        self.sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        steps = self.plan.profile_steps
        with profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            self.sync()
        attribute = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        events = [e for e in prof.key_averages() if getattr(e, attribute) > 0]
        # On CUDA only kernels and memcpys have device time; CPU-side aten ops have none and drop out above.
        total = sum(getattr(e, attribute) for e in events) or 1.0
        events.sort(key=lambda e: getattr(e, attribute), reverse=True)
        return [
            {
                "name": e.key[:100],
                "ms_per_step": getattr(e, attribute) / 1e3 / steps,
                "percent": 100.0 * getattr(e, attribute) / total,
                "calls_per_step": e.count / steps,
            }
            for e in events[:rows]
        ]

    def target(self, key: str, text: str, value: float | None, goal: float, unit: str, subject=None, note=""):
        """Record a target as pass / miss / n/a; a miss with a `subject` (the case's step) gets its profile."""
        if value is None:
            status, margin = "n/a", None
        else:
            status = "pass" if value >= goal else "miss"
            margin = value / goal - 1
        entry = dict(key=key, target=text, value=value, goal=goal, unit=unit, status=status, margin=margin, note=note)
        if status == "miss" and subject is not None and self.fits(f"profile of {key}"):
            try:
                entry["profile"] = self.top_kernels(subject)
            except Exception as error:  # a failed profile must not lose the measurements
                entry["profile_error"] = f"{type(error).__name__}: {error}"
        self.targets.append(entry)
        shown = "-" if value is None else f"{value:.3g}{unit}"
        print(f"  target {key}: {shown} vs >= {goal:g}{unit}: {status.upper()}", flush=True)


# ------------------------------------------------------------------------------------------------
# 1. CUDA tests
# ------------------------------------------------------------------------------------------------


def run_tests(run: Run) -> None:
    print("\n## 1. pytest -m cuda tests/test_cuda.py\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        started = time.perf_counter()
        try:
            done = subprocess.run(
                [*command, f"--junitxml={junit}"],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=run.plan.tests_timeout_s,
            )
            output, returncode = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as error:
            output, returncode = f"timed out after {run.plan.tests_timeout_s:.0f} s\n{error.stdout or ''}", None
        result = {"command": " ".join(command[1:]), "returncode": returncode, "seconds": time.perf_counter() - started}
        result.update(junit_counts(junit))
    print(output.strip()[-3000:])
    run.results["tests"] = result
    print(
        f"\n  passed {result['passed']}, failed {result['failed']}, errors {result['errors']}, "
        f"skipped {result['skipped']} ({result['seconds']:.0f} s)",
        flush=True,
    )


def junit_counts(path: Path) -> dict:
    counts = dict(passed=0, failed=0, errors=0, skipped=0, failures=[])
    if not path.exists():  # pytest did not get as far as writing its report
        return counts
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = case.get("name")
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            counts["failures"].append(f"{name}: {(outcome.get('message') or '').splitlines()[0][:300]}")
    return counts


# ------------------------------------------------------------------------------------------------
# 2. ATConv vs SDPA
# ------------------------------------------------------------------------------------------------


def triton_ops():
    """`sit_atconv.ops.atconv_triton` when it is importable and usable on this device, else None."""
    try:
        module = importlib.import_module("sit_atconv.ops.atconv_triton")
    except ImportError:
        return None
    return module


def conv_impls(device) -> list[str]:
    """The ATConv conv implementations to measure: the exact ones, and Triton's where it runs."""
    from sit_atconv.ops import atconv

    impls = ["channels_last", "shift"]
    triton = triton_ops()
    if triton is not None and "triton" in atconv.CONV_IMPLS and triton.triton_available(device):
        impls.append("triton")
    return impls


def atconv_core(module, impl: str):
    """ATConv's core op in one implementation, the part that stands where softmax(QK^T)V does: the
    differential modulation of the generated kernels k (B, C, K*K) with the module's gamma (Eq. 10) and the
    per-sample depthwise conv of the values v (B, H, W, C). Returns fn(v, k) -> (B, H, W, C)."""
    from sit_atconv.ops.atconv import depthwise_conv_channels_last, depthwise_conv_shift

    if impl == "triton":
        conv_triton = triton_ops().modulated_depthwise_conv  # the modulation is fused into its kernels
        return lambda v, k: conv_triton(v, k, module.gamma)
    conv = depthwise_conv_shift if impl == "shift" else depthwise_conv_channels_last
    return lambda v, k: conv(v, module.modulate_kernels(k))


def sdpa_backend(fn, inputs) -> str:
    """Which SDPA kernel torch dispatches for `fn(*inputs)`: the aten op it calls, named as
    torch.nn.attention.SDPBackend names its backends."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    backends = torch.nn.attention.SDPBackend
    names = {
        "cudnn": backends.CUDNN_ATTENTION,
        "flash": backends.FLASH_ATTENTION,
        "efficient": backends.EFFICIENT_ATTENTION,
    }
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.__name__:
                seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        fn(*inputs)
    ops = [name for name in seen if name != "scaled_dot_product_attention.default"]
    if not ops:
        return "unknown"
    backend = next((member for key, member in names.items() if key in ops[0]), backends.MATH)
    return f"{backend.name} ({ops[0]})"


def op_cases(run: Run, tokens: int) -> list[tuple[str, str, object, list, list]]:
    """(level, variant, function, inputs, parameters) of every operator variant at `tokens` tokens."""
    import torch
    import torch.nn.functional as F

    from sit_atconv.models.mixers import Attention
    from sit_atconv.ops import ATConv

    plan, device, dtype = run.plan, run.device, torch.bfloat16
    B, C, heads = plan.op_batch, plan.op_channels, plan.op_heads
    side = math.isqrt(tokens)
    if side * side != tokens:
        fail(f"--op tokens must be square numbers, got {tokens}")
    generator = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, device=device, dtype=dtype, generator=generator)

    cases = []
    x = randn(B, tokens, C)
    attention = Attention(C, heads).to(device, dtype)
    cases.append(("mixer", "attention", lambda t: attention(t, (side, side)), [x], list(attention.parameters())))
    for impl in conv_impls(device):
        module = ATConv(C, conv_impl=impl).to(device, dtype)
        with torch.no_grad():  # gamma starts at zero; a non-zero one exercises the modulation's gradient
            module.gamma.normal_(generator=generator)
        mixer = lambda t, m=module: m(t, (side, side))  # noqa: E731
        cases.append(("mixer", f"atconv/{impl}", mixer, [x], list(module.parameters())))
    q, k, v = (randn(B, heads, tokens, C // heads) for _ in range(3))
    cases.append(("core", "sdpa", F.scaled_dot_product_attention, [q, k, v], []))
    # As in the module: bf16 values, float32 kernels (generated in float32) and gamma.
    core = ATConv(C).to(device)
    with torch.no_grad():
        core.gamma.normal_(generator=generator)
    values, kernels = randn(B, side, side, C), randn(B, C, 9).float()
    for impl in conv_impls(device):
        cases.append(("core", f"atconv/{impl}", atconv_core(core, impl), [values, kernels], [core.gamma]))
    return cases


def op_pass(fn, inputs: list, params: list, backward: bool):
    """A closure running fn's forward (no autograd) or forward and backward (gradients of every input and
    parameter, through autograd.grad so that nothing accumulates)."""
    import torch

    if not backward:

        def forward():
            with torch.no_grad():
                fn(*inputs)

        return forward
    inputs = [t.detach().requires_grad_() for t in inputs]
    with torch.no_grad():
        grad_out = torch.randn_like(fn(*inputs))

    def forward_backward():
        torch.autograd.grad(fn(*inputs), inputs + params, grad_out)

    return forward_backward


def run_ops(run: Run) -> None:
    import torch

    plan = run.plan
    print(f"\n## 2. ATConv vs SDPA: C={plan.op_channels}, batch {plan.op_batch}, {plan.op_heads} heads, bf16\n")
    header = "| tokens | level | variant | mode | pass | ms | peak MiB | first call s |"
    print(header + "\n" + "|---" * 8 + "|", flush=True)
    steps = {}  # the closures of one size, kept for the profile of a missed target
    for tokens in plan.op_tokens:
        if not run.fits(f"ops at {tokens} tokens"):
            continue
        cases = op_cases(run, tokens)
        for level, variant, fn, inputs, params in cases:
            if variant == "sdpa":
                grad_inputs = [t.detach().requires_grad_() for t in inputs]
                run.results["sdpa_backends"][str(tokens)] = {
                    "fwd": sdpa_backend(fn, inputs),
                    "fwd+bwd": sdpa_backend(fn, grad_inputs),
                }
            # Compiling the core SDPA call changes nothing (it is one kernel); everything else runs both ways.
            modes = ("eager",) if variant == "sdpa" else ("eager", "compiled")
            for mode in modes:
                for name in plan.op_passes:
                    if not run.fits(f"ops {tokens} {level} {variant} {mode} {name}"):
                        continue
                    if mode == "compiled":
                        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale graphs
                        fn_mode = torch.compile(fn, backend=plan.compile_backend, dynamic=False)
                    else:
                        fn_mode = fn
                    step = op_pass(fn_mode, inputs, params, backward=name == "fwd+bwd")
                    row = dict(tokens=tokens, level=level, variant=variant, mode=mode, **{"pass": name})
                    row.update(run.measure(step, plan.warmup, plan.repeats))
                    run.results["ops"].append(row)
                    steps[(tokens, level, variant, mode, name)] = step
                    print(
                        f"| {tokens} | {level} | {variant} | {mode} | {name} | {row['ms']:.3f} "
                        f"| {fmt(row['peak_mib'], '.0f')} | {row['first_call_s']:.1f} |",
                        flush=True,
                    )
        op_target(run, tokens, steps)
        steps.clear()
        del cases
        run.free()
    for tokens, backends in run.results["sdpa_backends"].items():
        print(f"  SDPA backend at {tokens} tokens: {backends}")


def op_target(run: Run, tokens: int, steps: dict) -> None:
    """ATConv's core op, forward+backward at 1024 tokens (the fastest variant), >= 2x faster than SDPA."""
    target_tokens = 1024 if 1024 in run.plan.op_tokens else run.plan.op_tokens[0]
    if tokens != target_tokens:
        return
    rows = [r for r in run.results["ops"] if r["tokens"] == tokens and r["level"] == "core" and r["pass"] == "fwd+bwd"]
    sdpa = [r for r in rows if r["variant"] == "sdpa"]
    ours = sorted((r for r in rows if r["variant"] != "sdpa"), key=lambda r: r["ms"])
    value = sdpa[0]["ms"] / ours[0]["ms"] if sdpa and ours else None
    best = ours[0] if ours else None
    subject = steps.get((tokens, "core", best["variant"], best["mode"], "fwd+bwd")) if best else None
    note = f"fastest ATConv core: {best['variant']} {best['mode']}" if best else ""
    text = f"ATConv core op fwd+bwd at {tokens} tokens >= 2x faster than SDPA"
    run.target("op_1024", text, value, 2.0, "x", subject, note)


# ------------------------------------------------------------------------------------------------
# 3. Training step
# ------------------------------------------------------------------------------------------------


def build(run: Run, name: str, latent: int):
    """A registry model built straight on the device (its initialisation runs there, not on the CPU)."""
    import torch

    from sit_atconv.models import create_model

    with torch.device(run.device):
        return create_model(name, input_size=latent, **run.plan.model_overrides)


def forward_flops(model, x, *args) -> int:
    """FLOPs of one forward as torch.utils.flop_counter counts them (2 per multiply-add, matmuls, convs
    and attention; elementwise work is not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            model(x, *args)
    return counter.get_total_flops()


def run_train(run: Run) -> None:
    import torch

    from sit_atconv.transport import Transport

    plan, device = run.plan, run.device
    peak = peak_tflops(run.results["machine"].get("gpu"))
    print("\n## 3. Training step: forward + loss + backward + AdamW(fused) step, bf16 autocast\n")
    print(f"  MFU over a dense bf16 peak of {fmt(peak, 'g')} TFLOP/s (model FLOPs of one forward x 3)\n")
    print("| model | px | batch | mode | step ms | images/s | peak GiB | MFU | first call s |")
    print("|---" * 9 + "|", flush=True)
    transport = Transport()
    for latent, batch in plan.train_cases:
        for name in MODELS:
            if not run.fits(f"train {name} {latent * 8} px"):
                continue
            model = build(run, name, latent).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            generator = torch.Generator(device).manual_seed(0)
            x = torch.randn(batch, 4, latent, latent, device=device, generator=generator)
            y = torch.randint(0, model.config.num_classes, (batch,), device=device, generator=generator)
            flops = forward_flops(model, x, torch.rand(batch, device=device), y)

            def step(model=model, optimizer=optimizer, x=x, y=y):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = transport.loss(model, x, {"y": y}).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            for mode in ("eager", "compiled"):
                if not run.fits(f"train {name} {latent * 8} px {mode}"):
                    continue
                if mode == "compiled":
                    torch._dynamo.reset()
                    for block in model.blocks:  # regional compilation: identical blocks share one graph
                        block.compile(backend=plan.compile_backend, dynamic=False)
                row = dict(model=name, px=latent * 8, latent=latent, batch=batch, mode=mode, forward_flops=flops)
                row.update(run.measure(step, plan.warmup, plan.train_repeats))
                seconds = row["ms"] / 1e3
                row["images_per_s"] = batch / seconds
                row["mfu"] = 3 * flops / seconds / (peak * 1e12) if peak else None
                run.results["train"].append(row)
                print(
                    f"| {name} | {row['px']} | {batch} | {mode} | {row['ms']:.1f} | {row['images_per_s']:.1f} "
                    f"| {fmt(row['peak_total_gib'], '.1f')} | {fmt(row['mfu'], '.1%')} | {row['first_call_s']:.1f} |",
                    flush=True,
                )
            train_targets(run, name, latent, batch, step)
            del model, optimizer, step, x, y
            run.free()


def pick(rows: list[dict], mode: str) -> dict | None:
    """The row of `mode` among one case's rows, else the eager one (compile skipped or failed)."""
    by_mode = {r["mode"]: r for r in rows}
    return by_mode.get(mode) or by_mode.get("eager")


TRAIN_GOALS = (("train_256", 1.25), ("train_512", 1.4))  # per entry of Plan.train_cases


def train_targets(run: Run, name: str, latent: int, batch: int, step) -> None:
    """After SiT-XL/2 of the first size: its MFU; after SiT-ATConv-XL/2: its speed-up over SiT-XL/2."""
    rows = [r for r in run.results["train"] if (r["latent"], r["batch"]) == (latent, batch)]
    base = pick([r for r in rows if r["model"] == BASELINE], run.plan.target_mode)
    if name == BASELINE and latent == run.plan.train_cases[0][0]:
        gpu = run.results["machine"].get("gpu") or "no GPU"
        note = f"{base['mode']}; the target is set for an H100, this is {gpu}" if base else ""
        value = base["mfu"] if base and base["mfu"] is not None else None
        text = f"{BASELINE} training MFU at {latent * 8} px >= 40% (H100)"
        run.target("mfu_sit_xl", text, None if value is None else 100 * value, 40.0, "%", step, note)
    if name != ATCONV:
        return
    key, goal = TRAIN_GOALS[min(run.plan.train_cases.index((latent, batch)), len(TRAIN_GOALS) - 1)]
    ours = pick([r for r in rows if r["model"] == ATCONV], run.plan.target_mode)
    value = ours["images_per_s"] / base["images_per_s"] if ours and base else None
    text = f"{ATCONV} training images/s at {latent * 8} px >= {goal}x {BASELINE}"
    run.target(key, text, value, goal, "x", step, ours["mode"] if ours else "")


# ------------------------------------------------------------------------------------------------
# 4. Sampling
# ------------------------------------------------------------------------------------------------


def run_sample(run: Run) -> None:
    import torch

    from sit_atconv.generation import GenerationConfig, generate
    from sit_atconv.transport import SamplingSpec

    plan, device = run.plan, run.device
    B, latent = plan.sample_batch, plan.sample_latent
    print(f"\n## 4. Sampling: Euler {plan.sample_steps} steps, CFG {plan.cfg_scale}, batch {B}, {latent * 8} px\n")
    print("| model | ms per batch | images/s | model calls | peak GiB |")
    print("|---" * 5 + "|", flush=True)

    def config(steps: int) -> GenerationConfig:
        return GenerationConfig(spec=SamplingSpec(sampler="euler", num_steps=steps, cfg=plan.cfg_scale))

    latents = None
    for name in MODELS:
        if not run.fits(f"sample {name}"):
            continue
        model = build(run, name, latent).eval()
        labels = torch.arange(B) % model.config.num_classes
        calls = []

        def sample(steps: int, model=model, labels=labels, calls=calls):
            nonlocal latents
            latents, used = generate(model, None, range(B), labels, config(steps), device, torch.bfloat16)
            calls.append(used)

        sample(2)  # warm-up: cuBLAS handles and autocast caches, without paying for 50 steps
        row = dict(model=name, px=latent * 8, batch=B, steps=plan.sample_steps, cfg=plan.cfg_scale)
        row.update(run.measure(lambda s=sample: s(plan.sample_steps), 0, plan.sample_repeats))
        row["images_per_s"] = B / (row["ms"] / 1e3)
        row["model_calls"] = calls[-1]
        run.results["sample"].append(row)
        print(
            f"| {name} | {row['ms']:.0f} | {row['images_per_s']:.1f} | {row['model_calls']} "
            f"| {fmt(row['peak_total_gib'], '.1f')} |",
            flush=True,
        )
        if name == ATCONV:
            base = next((r for r in run.results["sample"] if r["model"] == BASELINE), None)
            value = row["images_per_s"] / base["images_per_s"] if base else None

            def subject(model=model, labels=labels):  # one guided model call is one step of the sampler
                generate(model, None, range(B), labels, config(1), device, torch.bfloat16)

            text = f"{ATCONV} sampling images/s at {latent * 8} px >= 1.25x {BASELINE}"
            run.target("sample_256", text, value, 1.25, "x", subject, "eager")
        del model, sample
        run.free()
    if latents is not None and run.fits("VAE decode"):
        run_vae(run, latents)
        run.free()


def run_vae(run: Run, latents) -> None:
    """Decode time of a random-weight AutoencoderKL with SD-VAE's architecture, built from its config."""
    import torch
    from diffusers import AutoencoderKL

    from sit_atconv.vae import decode

    blocks = len(run.plan.vae["block_out_channels"])
    with torch.device(run.device):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            latent_channels=4,
            **run.plan.vae,
        )
    vae = vae.to(dtype=torch.bfloat16).eval()
    with torch.no_grad():
        row = run.measure(lambda: decode(vae, latents), 1, run.plan.sample_repeats)
    B = latents.shape[0]
    row.update(batch=B, dtype="bf16", config=dict(run.plan.vae), images_per_s=B / (row["ms"] / 1e3))
    row["image_px"] = latents.shape[-1] * 2 ** (blocks - 1)
    run.results["vae"] = row
    print(
        f"\n  VAE decode (random SD-VAE-sized AutoencoderKL, bf16): {row['ms']:.0f} ms per batch of {row['batch']}, "
        f"{row['images_per_s']:.1f} images/s, peak {fmt(row['peak_total_gib'], '.1f')} GiB",
        flush=True,
    )


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# 5. Sharded training (train.parallel=fsdp) next to DDP, one process
# ------------------------------------------------------------------------------------------------


def run_fsdp(run: Run) -> None:
    """The trainer itself (benchmarks/bench_parallel.py) with train.parallel ddp and then fsdp in this one process:
    the sharded path (FSDP2 on nccl, its checkpoint at the last step) runs on the GPU, at what throughput."""
    from benchmarks.bench_parallel import measure, overrides

    model, resolution, batch, steps = run.plan.fsdp_case
    precision = "bf16" if run.cuda else "fp32"
    print(f"\n## 5. Sharded training: {model}, {resolution} px digits, batch {batch}, {precision}, one process\n")
    print("| parallel | steps/s | images/s | state GiB | peak GiB |")
    print("|---|---:|---:|---:|---:|", flush=True)
    settings = overrides(model, resolution, batch, steps, bf16=run.cuda)
    settings += [f"model.{key}={value}" for key, value in run.plan.model_overrides.items()]
    for parallel in ("ddp", "fsdp"):
        if not run.fits(f"fsdp section: {parallel}"):
            continue
        with tempfile.TemporaryDirectory(prefix="gpu-check-fsdp-") as tmp:
            row = measure(parallel, settings, Path(tmp) / "run")
        row.update(model=model, px=resolution, batch=batch, steps=steps, images_per_s=row["steps_per_s"] * batch)
        run.results["fsdp"].append(row)
        print(
            f"| {parallel} | {row['steps_per_s']:.2f} | {row['images_per_s']:.1f} | {row['state_gib']:.2f} "
            f"| {fmt(row['peak_gib'], '.1f')} |",
            flush=True,
        )
        run.free()


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(run: Run, results: dict) -> str:
    """The .md report: machine, tests, the tables of every section, targets and missed targets' profiles."""
    machine = results["machine"]
    lines = [f"# GPU check: {machine.get('gpu') or machine['device']}, {results['date']}", ""]
    lines.append(f"`{results['command']}`{' (quick)' if run.quick else ''}, {results['seconds']:.0f} s in all.")
    lines.append("")
    lines.append("| " + " | ".join(machine) + " |")
    lines.append("|---" * len(machine) + "|")
    lines.append("| " + " | ".join(str(v) for v in machine.values()) + " |")
    lines.append("")
    tests = results["tests"]
    if tests:
        lines += ["## 1. CUDA tests", ""]
        lines.append(
            f"`{tests['command']}`: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped (return code {tests['returncode']}, {tests['seconds']:.0f} s)."
        )
        lines += [f"- {failure}" for failure in tests["failures"]]
        lines.append("")
    if results["ops"]:
        plan = run.plan
        lines += [f"## 2. ATConv vs SDPA (C={plan.op_channels}, batch {plan.op_batch}, {plan.op_heads} heads, bf16)"]
        lines += [
            "",
            f"Compiled: torch.compile(backend={plan.compile_backend!r}, dynamic=False), one fresh cache per case.",
        ]
        lines += ["Peak MiB: allocated beyond the inputs and weights. First call: includes compilation.", ""]
        lines += table(
            ["tokens", "level", "variant", "mode", "pass", "ms", "peak MiB", "first call s"],
            [
                [r["tokens"], r["level"], r["variant"], r["mode"], r["pass"], f"{r['ms']:.3f}"]
                + [fmt(r["peak_mib"], ".0f"), fmt(r["first_call_s"], ".1f")]
                for r in results["ops"]
            ],
        )
        for tokens, backends in results["sdpa_backends"].items():
            lines.append(
                f"- SDPA backend at {tokens} tokens: forward {backends['fwd']}; with grad {backends['fwd+bwd']}"
            )
        lines.append("")
    if results["train"]:
        lines += ["## 3. Training step (forward + loss + backward + AdamW fused), bf16 autocast", ""]
        lines.append(f"MFU over a dense bf16 peak of {fmt(results['peak_bf16_tflops'], 'g')} TFLOP/s.")
        lines.append("")
        lines += table(
            ["model", "px", "batch", "mode", "step ms", "images/s", "peak GiB", "GFLOP/img fwd", "MFU", "first s"],
            [
                [r["model"], r["px"], r["batch"], r["mode"], f"{r['ms']:.1f}", f"{r['images_per_s']:.1f}"]
                + [fmt(r["peak_total_gib"], ".1f"), f"{r['forward_flops'] / r['batch'] / 1e9:.1f}"]
                + [fmt(r["mfu"], ".1%"), fmt(r["first_call_s"], ".1f")]
                for r in results["train"]
            ],
        )
        lines.append("")
    if results["sample"]:
        plan = run.plan
        lines += [f"## 4. Sampling (Euler {plan.sample_steps} steps, CFG {plan.cfg_scale}, bf16, VAE excluded)", ""]
        lines += table(
            ["model", "px", "batch", "ms per batch", "images/s", "model calls", "peak GiB"],
            [
                [r["model"], r["px"], r["batch"], f"{r['ms']:.0f}", f"{r['images_per_s']:.1f}", r["model_calls"]]
                + [fmt(r["peak_total_gib"], ".1f")]
                for r in results["sample"]
            ],
        )
        vae = results["vae"]
        if vae:
            lines.append("")
            lines.append(
                f"VAE decode (random-weight AutoencoderKL, {vae['config']}, bf16): {vae['ms']:.0f} ms per batch of "
                f"{vae['batch']} ({vae['image_px']} px), {vae['images_per_s']:.1f} images/s."
            )
        lines.append("")
    if results["fsdp"]:
        first = results["fsdp"][0]
        lines += [
            f"## 5. Sharded training ({first['model']}, {first['px']} px digits, batch {first['batch']}, one process)"
        ]
        lines += ["", "The trainer with train.parallel=ddp and fsdp; state: weights, gradients, AdamW and EMA.", ""]
        lines += table(
            ["parallel", "steps/s", "images/s", "state GiB", "peak GiB"],
            [
                [r["parallel"], f"{r['steps_per_s']:.2f}", f"{r['images_per_s']:.1f}", f"{r['state_gib']:.2f}"]
                + [fmt(r["peak_gib"], ".1f")]
                for r in results["fsdp"]
            ],
        )
        lines.append("")
    lines += ["## Targets", ""]
    lines += table(
        ["target", "measured", "goal", "status", "margin", "note"],
        [
            [
                t["target"],
                fmt(t["value"], ".3g") + t["unit"] if t["value"] is not None else "-",
                f"{t['goal']:g}{t['unit']}",
            ]
            + [t["status"], fmt(t["margin"], "+.0%"), t["note"]]
            for t in results["targets"]
        ],
    )
    for t in results["targets"]:
        if "profile" in t or "profile_error" in t:
            lines += ["", f"### Missed: {t['target']}", "", "Top kernels (torch.profiler, self time):", ""]
            if "profile_error" in t:
                lines.append(f"profile failed: {t['profile_error']}")
                continue
            lines += table(
                ["kernel", "ms per step", "%", "calls per step"],
                [
                    [f"`{k['name']}`", f"{k['ms_per_step']:.3f}", f"{k['percent']:.1f}", f"{k['calls_per_step']:g}"]
                    for k in t["profile"]
                ],
            )
    if results["skipped"]:
        lines += ["", "## Skipped (time budget)", ""] + [f"- {s}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + [
        "| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows
    ]


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

# Run in this order: the ops section compiles the most graphs for one target, so it goes last, where the time
# budget cuts it rather than the training and sampling targets. Reports keep the numbering of the issue.
SECTIONS = {"tests": run_tests, "train": run_train, "sample": run_sample, "fsdp": run_fsdp, "ops": run_ops}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one size per section, fewer repeats (~3 minutes)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder of the reports")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    # The CPU smoke run of the tests: every section at toy sizes (`--device cpu --tiny`).
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    check_packages()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        fail(
            f"no CUDA device is available (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "gpu_check measures a GPU and has nothing to do without one"
        )
    if args.device == "cpu" and not args.tiny:
        fail("--device cpu is only for the toy-size smoke run: add --tiny")
    plan = TINY if args.tiny else QUICK if args.quick else FULL
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast run as they do in training
    torch.backends.cudnn.allow_tf32 = True
    run = Run(plan, device, args.quick)
    date = datetime.date.today().isoformat()
    results = run.results
    results["machine"] = machine_info(device)
    results["peak_bf16_tflops"] = peak_tflops(results["machine"].get("gpu"))
    gpu = results["machine"]["gpu"] or "cpu-tiny"
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    print(f"# GPU check on {gpu}: torch {torch.__version__}, {mode} run", flush=True)

    for name in args.sections:
        started = time.perf_counter()
        try:
            SECTIONS[name](run)
        except Exception as error:  # one broken section must not lose the others' measurements
            import traceback

            traceback.print_exc()
            results.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"
            run.free()
        print(f"  ({name}: {time.perf_counter() - started:.0f} s, {run.elapsed():.0f} s in all)", flush=True)

    results.update(
        date=date,
        command="python3 benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        seconds=run.elapsed(),
        plan=asdict(plan),
        targets=run.targets,
        skipped=run.skipped,
    )
    write_reports(run, results, args.out, f"{slug(gpu)}-{date}{'-quick' if args.quick else ''}")
    failed = (results["tests"] or {}).get("failed", 0) + (results["tests"] or {}).get("errors", 0)
    return 1 if failed or results.get("errors") else 0


def write_reports(run: Run, results: dict, folder: Path, stem: str) -> None:
    from sit_atconv.io import atomic_output, write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"{stem}.json", results)
    with atomic_output(folder / f"{stem}.md") as tmp:
        Path(tmp).write_text(markdown(run, results))
    print(f"\nwrote {folder / stem}.json and .md", flush=True)
    shown = {**results, "ops": [], "train": [], "sample": [], "vae": None, "tests": None, "fsdp": []}
    print("\n" + markdown(run, shown))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run as a script: section 5 imports benchmarks.bench_parallel
    sys.exit(main())
