"""benchmarks/gpu_check.py on the CPU: its toy-size smoke run end to end, and its refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")]


@pytest.mark.slow  # about a minute on 2 cores: every section, triton in its interpreter where set
def test_tiny_cpu_run_measures_every_section_and_writes_both_reports(tmp_path):
    done = subprocess.run(
        [*SCRIPT, "--device", "cpu", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report,) = tmp_path.glob("cpu-tiny-*.json")
    results = json.loads(report.read_text())
    markdown = report.with_suffix(".md").read_text()

    tests = results["tests"]  # every CUDA test ran through pytest and was skipped here, none failed
    assert tests["skipped"] >= 8 and tests["passed"] == tests["failed"] == tests["errors"] == 0
    assert not results.get("errors") and not results["skipped"]

    ops = {(r["tokens"], r["level"], r["variant"], r["mode"], r["pass"]) for r in results["ops"]}
    for level, sdpa in (("mixer", "attention"), ("core", "sdpa")):
        for variant in (sdpa, "atconv/channels_last", "atconv/shift"):
            modes = ("eager",) if variant == "sdpa" else ("eager", "compiled")
            assert {(16, level, variant, mode, p) for mode in modes for p in ("fwd", "fwd+bwd")} <= ops
    assert set(results["sdpa_backends"]) == {"16", "64"}

    train = {(r["model"], r["px"], r["mode"]) for r in results["train"]}
    assert train == {(m, px, mode) for m in gpu_check.MODELS for px in (64, 128) for mode in ("eager", "compiled")}
    assert all(r["images_per_s"] > 0 and r["forward_flops"] > 0 and r["mfu"] is None for r in results["train"])
    assert [r["model"] for r in results["sample"]] == list(gpu_check.MODELS)
    assert all(r["model_calls"] == 3 for r in results["sample"])  # Euler steps; CFG batches cond and uncond
    assert results["vae"]["image_px"] == 16

    assert [r["parallel"] for r in results["fsdp"]] == ["ddp", "fsdp"]  # the trainer ran both ways
    assert all(r["steps_per_s"] > 0 and r["state_gib"] > 0 for r in results["fsdp"])

    targets = {t["key"]: t for t in results["targets"]}
    assert set(targets) == {"op_1024", "mfu_sit_xl", "train_256", "train_512", "sample_256"}
    assert targets["mfu_sit_xl"]["status"] == "n/a"  # no known peak on a CPU
    for target in targets.values():
        assert target["status"] in ("pass", "miss", "n/a")
        if target["status"] == "miss":  # each miss comes with its case's top operators
            assert target["profile"] and f"### Missed: {target['target']}" in markdown
    for heading in (
        "## 1. CUDA tests",
        "## 2. ATConv vs SDPA",
        "## 3. Training step",
        "## 4. Sampling",
        "## 5. Sharded",
        "## Targets",
    ):
        assert heading in markdown


def test_without_cuda_it_stops_at_once_with_exit_2():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(SCRIPT, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2 and "no CUDA device is available" in done.stderr
    assert not done.stdout  # nothing measured, nothing written


def test_cpu_only_as_the_tiny_smoke_run(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--device", "cpu"])
    assert exit_info.value.code == 2 and "--tiny" in capsys.readouterr().err


def test_a_missing_package_names_its_wheel(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.check_packages()
    message = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"diffusers=={gpu_check.pinned_version('diffusers')}" in message and "make gpu-wheels" in message


def test_peak_table_and_slug():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("NVIDIA L4") is None and gpu_check.peak_tflops(None) is None
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
