"""Trainer: config, EMA, weight decay groups, data order, exact resume, atomic checkpoints, NaN, DDP."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import dinov2_small_weights, launch_two_processes, single_thread_env, tiny_overrides, tiny_vae

from sit_atconv.data import StepBatches
from sit_atconv.models import create_model
from sit_atconv.training import (
    NonFiniteError,
    complete_checkpoints,
    find_resume,
    load_config,
    param_groups,
    train,
    update_ema,
)
from sit_atconv.training.trainer import build_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "digits.yaml"


def test_ema_update_rule():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in ema.parameters()]
    update_ema(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)


def test_weight_decay_skips_biases_norms_and_gamma():
    model = create_model("SiT-ATConv-S/2", depth=1, hidden_size=16, num_heads=2, input_size=4)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.0.mixer.gamma" in skipped and "blocks.0.mixer.value_proj.bias" in skipped
    # the same two groups without decay, so that a resume may change train.weight_decay
    assert [len(g["params"]) for g in param_groups(model, 0.0)] == [len(decay["params"]), len(no_decay["params"])]


def test_batches_are_a_function_of_the_step():
    one = StepBatches(100, 12, seed=3)
    two = [StepBatches(100, 12, world_size=2, rank=r, seed=3) for r in range(2)]
    it1, it2 = iter(one), [iter(s) for s in two]
    for _ in range(20):  # crosses epoch boundaries (8 steps per epoch)
        assert next(it1) == next(it2[0]) + next(it2[1])
    resumed = iter(StepBatches(100, 12, seed=3, start_step=13))
    fresh = iter(StepBatches(100, 12, seed=3))
    for _ in range(13):
        next(fresh)
    assert [next(resumed) for _ in range(5)] == [next(fresh) for _ in range(5)]
    with pytest.raises(ValueError, match="not divisible by processes x accumulation"):
        StepBatches(100, 10, world_size=4)


def test_resume_continues_exactly(tmp_path):
    full = train(load_config(DEMO, tiny_overrides(tmp_path / "full")), resume="none", progress=False)
    part = tmp_path / "part"
    train(load_config(DEMO, tiny_overrides(part, steps=3)), resume="none", progress=False)
    resumed = train(load_config(DEMO, tiny_overrides(part, steps=6)), resume="auto", progress=False)
    assert [s for s, _ in resumed.losses] == [4, 5, 6]
    assert resumed.losses == full.losses[3:]  # bit-identical loss sequence on CPU
    assert (part / "loss.png").exists() and (part / "checkpoints" / "latest").resolve().name == "step_00000006"


def test_interrupted_checkpoint_is_never_resumed(tmp_path):
    run = tmp_path / "run"
    train(load_config(DEMO, tiny_overrides(run, steps=3)), resume="none", progress=False)
    partial = run / "checkpoints" / ".tmp_step_00000006"  # a write killed half-way
    (partial / "model").mkdir(parents=True)
    assert [p.name for p in complete_checkpoints(run)] == ["step_00000003"]
    assert find_resume(run, "auto").name == "step_00000003"
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint: it has no checkpoint.json"):
        find_resume(run, str(partial))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.filterwarnings("ignore:train.parallel=fsdp with a single process")
def test_non_finite_loss_stops_with_the_step_and_saves_nothing_poisoned(tmp_path, monkeypatch, parallel):
    """(fsdp: the skipped update and EMA decided on the sharded weights, in one process.)"""
    from sit_atconv.transport import Transport

    real_loss = Transport.loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        losses, extras = real_loss(self, *args, **kwargs)  # the trainer asks for (losses, extras)
        return (losses * float("nan") if calls["n"] == 5 else losses), extras

    monkeypatch.setattr(Transport, "loss", loss)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="at step 5"):
        train(load_config(DEMO, tiny_overrides(run, **{"train.parallel": parallel})), resume="none", progress=False)
    assert [p.name for p in complete_checkpoints(run)] == ["step_00000003"]
    calls["n"] = 0
    result = train(
        load_config(
            DEMO, tiny_overrides(tmp_path / "skip", **{"train.on_nonfinite": "skip", "train.parallel": parallel})
        ),
        resume="none",
        progress=False,
    )
    assert [s for s, _ in result.losses] == [1, 2, 3, 4, 6]
    assert all(math.isfinite(loss) for _, loss in result.losses)


def test_loss_decreases_on_the_demo_data(tmp_path):
    result = train(load_config(DEMO, tiny_overrides(tmp_path, steps=60, **{"train.lr": 1e-3})), "none", False)
    losses = [loss for _, loss in result.losses]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


DDP_SCRIPT = """
import sys, torch
from sit_atconv.training import load_config, train
from accelerate import PartialState
config = load_config(sys.argv[1], sys.argv[3:])
result = train(config, resume="none", progress=False)
state = PartialState()
from safetensors.torch import load_file
torch.save({"world": state.num_processes, "losses": result.losses}, f"{sys.argv[2]}_{state.process_index}.pt")
"""


def test_two_process_data_parallel_equals_one_process(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    common = tiny_overrides(tmp_path / "ddp", steps=3, **{"checkpoint.every": 3})
    args = [str(script), str(DEMO), str(tmp_path / "rank"), *common]
    proc = launch_two_processes(args, tmp_path, 29519, single_thread_env(PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank_{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world"] == 2 and ranks[0]["losses"] == ranks[1]["losses"]

    single = train(load_config(DEMO, tiny_overrides(tmp_path / "single", steps=3)), resume="none", progress=False)
    from safetensors.torch import load_file

    two = load_file(
        tmp_path / "ddp" / "checkpoints" / "step_00000003" / "model" / "diffusion_pytorch_model.safetensors"
    )
    one = load_file(single.checkpoint / "model" / "diffusion_pytorch_model.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    assert json.loads(json.dumps(ranks[0]["losses"]))  # plain numbers, one per step


def test_latent_training_with_repa(tmp_path):
    """Extract latents with a tiny f8 VAE, then train with REPA (DINOv2 ViT-S architecture, random weights
    from a local file) for a few steps, checkpoint and resume."""
    import numpy as np
    from accelerate import Accelerator
    from PIL import Image

    from sit_atconv.data.images import ImageFolderDataset
    from sit_atconv.data.latents import extract_latents

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        for i in range(4):
            (tmp_path / "images" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
                tmp_path / "images" / label / f"{i}.png"
            )
    vae = tiny_vae(blocks=4)  # f8, like SD-VAE
    extract_latents(
        Accelerator(cpu=True),
        ImageFolderDataset(tmp_path / "images", 64),
        vae,
        tmp_path / "latents",
        shard_size=4,
        batch_size=4,
        flip=True,
        num_workers=0,
        progress=False,
    )
    weights = dinov2_small_weights(tmp_path)

    def overrides(steps):
        return tiny_overrides(
            tmp_path / "run",
            steps=steps,
            **{
                "data.kind": "latents",
                "data.path": str(tmp_path / "latents"),
                "model.in_channels": 4,
                "model.num_classes": 2,
                "train.global_batch_size": 4,
                "checkpoint.every": 2,
                "repa.enabled": True,
                "repa.encoder": "dinov2-vit-s",
                "repa.encoder_weights": str(weights),
                "repa.encoder_depth": 1,
                "repa.projector_dim": 32,
            },
        )

    first = train(load_config(DEMO, overrides(2)), resume="none", progress=False)
    assert (first.checkpoint / "projector.safetensors").is_file()
    resumed = train(load_config(DEMO, overrides(4)), resume="auto", progress=False)
    assert [s for s, _ in resumed.losses] == [3, 4]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    repa = float(last[header.index("repa_loss")])
    assert -1.0 <= repa <= 1.0  # a mean negative cosine similarity


TABLE_VIII_CONFIGS = {
    "imagenet256/sit_b2_repa.yaml": ("SiT-B/2", 130_315_808, 4),
    "imagenet256/sit_atconv_b2_repa.yaml": ("SiT-ATConv-B/2", 123_239_000, 4),
    "imagenet256/sit_hybrid_b2_repa.yaml": ("SiT-Hybrid-B/2", 126_777_404, 4),
    "imagenet256/sit_l2_repa.yaml": ("SiT-L/2", 457_840_672, 8),
    "imagenet256/sit_atconv_l2_repa.yaml": ("SiT-ATConv-L/2", 432_677_008, 8),
    "imagenet256/sit_hybrid_l2_repa.yaml": ("SiT-Hybrid-L/2", None, 8),
    "imagenet256/sit_xl2_repa.yaml": ("SiT-XL/2", 674_834_720, 8),
    "imagenet256/sit_atconv_xl2_repa.yaml": ("SiT-ATConv-XL/2", 637_678_328, 8),
    "imagenet256/sit_hybrid_xl2_repa.yaml": ("SiT-Hybrid-XL/2", None, 8),
    "ffhq512/sit_xl2.yaml": ("SiT-XL/2", None, None),
    "ffhq512/sit_atconv_xl2.yaml": ("SiT-ATConv-XL/2", None, None),
}


@pytest.mark.parametrize("path,expected", TABLE_VIII_CONFIGS.items())
def test_paper_configs_build_the_paper_models(path, expected):

    name, params, encoder_depth = expected
    config = load_config(ROOT / "configs" / path)
    assert config.model.name == name and config.train.mixed_precision == "bf16"
    with torch.device("meta"):
        model = build_model(config)
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params
    if path.startswith("imagenet256"):
        assert (
            config.repa.enabled and config.repa.encoder_depth == encoder_depth and config.train.global_batch_size == 256
        )
    else:
        assert model.config.num_classes == 0 and model.config.input_size == 64 and not config.repa.enabled


# ------------------------------------------------------------------------------------------------
# The GPU-ready hot path, proved on the CPU
# ------------------------------------------------------------------------------------------------


def test_host_reads_scale_with_log_steps_not_with_steps(tmp_path, monkeypatch):
    """The loop reads numbers back from the device (which waits for a GPU) only when it logs or saves:
    twice the steps between two flushes cost no extra reads. (The data order's permutation, a CPU tensor
    in sit_atconv/data whatever the device, is not counted.)"""
    import traceback

    reads = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            caller = traceback.extract_stack(limit=2)[0].filename
            reads["n"] += "sit_atconv/data/" not in caller
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for steps in (4, 8):
        reads["n"] = 0
        extra = {"log.every": 100, "checkpoint.every": 100}
        train(load_config(DEMO, tiny_overrides(tmp_path / str(steps), steps, **extra)), "none", False)
        counts.append(reads["n"])
    assert counts[0] == counts[1], counts


def test_compiled_training_matches_eager_and_never_recompiles(tmp_path, monkeypatch):
    """train.compile=true (aot_eager here: the same tracing and autograd graphs as inductor, without its
    C++ build time) with CFG previews in between (the EMA copy, another batch size) compiles the step once."""
    import functools

    import torch._dynamo

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    extra = {"preview.every": 2, "preview.cfg": 2.0, "preview.num_steps": 2}
    eager = train(load_config(DEMO, tiny_overrides(tmp_path / "eager", 4, **extra)), "none", False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        config = load_config(DEMO, tiny_overrides(tmp_path / "compiled", 4, **extra, **{"train.compile": True}))
        compiled = train(config, "none", False)
    assert [s for s, _ in compiled.losses] == [1, 2, 3, 4]
    torch.testing.assert_close([v for _, v in compiled.losses], [v for _, v in eager.losses], rtol=1e-4, atol=0)
    assert (tmp_path / "compiled" / "samples" / "step_00000004.png").exists()


def test_without_a_working_compiler_training_falls_back_to_eager(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    config = load_config(DEMO, tiny_overrides(tmp_path, 2, **{"train.compile": True}))
    with pytest.warns(UserWarning, match=r"train.compile: torch.compile does not work here \(InvalidCxxCompiler"):
        result = train(config, "none", False)
    assert len(result.losses) == 2


def test_gradient_checkpointing_changes_memory_not_numbers(tmp_path):
    plain = train(load_config(DEMO, tiny_overrides(tmp_path / "plain", 3)), "none", False)
    config = load_config(DEMO, tiny_overrides(tmp_path / "ckpt", 3, **{"train.grad_checkpointing": True}))
    assert train(config, "none", False).losses == plain.losses


def test_bf16_training_follows_fp32(tmp_path):
    """bf16 autocast (on the CPU here) with fp32 LayerNorm statistics, kernel generation and loss: the loss
    curve of 8 steps stays within 2% of fp32's."""
    from accelerate.state import AcceleratorState

    fp32 = train(load_config(DEMO, tiny_overrides(tmp_path / "fp32", 8)), "none", False)
    config = load_config(DEMO, tiny_overrides(tmp_path / "bf16", 8, **{"train.mixed_precision": "bf16"}))
    AcceleratorState._reset_state(reset_partial_state=True)  # a process keeps one precision otherwise
    try:
        bf16 = train(config, "none", False)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert all(math.isfinite(v) for _, v in bf16.losses)
    torch.testing.assert_close([v for _, v in bf16.losses], [v for _, v in fp32.losses], rtol=0.02, atol=0)


def test_a_training_statistic_is_one_name_and_one_report(tmp_path, monkeypatch):
    """A new logged number: its name in logs.TRAINING_STATS and one `stats.report(name, value)` where it is
    computed; it is read back with the others once per log step and reaches metrics.csv (a row per log step,
    the mean over the micro-batches) and the trackers."""
    from sit_atconv.training import logs, trainer

    monkeypatch.setattr(logs, "TRAINING_STATS", (*logs.TRAINING_STATS, "batch_mean"))
    real_step = trainer.train_step

    def train_step(accelerator, model, optimizer, loader, batches, noise, forward_loss, config):
        result = real_step(accelerator, model, optimizer, loader, batches, noise, forward_loss, config)
        for value in (1.0, 3.0):  # as two micro-batches would report it
            result.stats.report("batch_mean", noise["t"].new_tensor(value) * noise["t"].shape[0])
        return result

    monkeypatch.setattr(trainer, "train_step", train_step)
    logged = []
    monkeypatch.setattr(logs.TrainingLog, "_append", lambda self, row: logged.append(row))
    overrides = tiny_overrides(tmp_path, steps=4, **{"log.every": 2})
    train(load_config(DEMO, overrides), resume="none", progress=False)
    assert [(row["step"], row["batch_mean"]) for row in logged] == [(2, 32.0), (4, 32.0)]  # 2 x 16 rows
    assert logs.metric_fields()[:5] == ("step", "loss", "repa_loss", "grad_norm", "batch_mean")
    with pytest.raises(KeyError, match="'typo' is not one of TRAINING_STATS"):
        logs.StepStats().report("typo", torch.ones(()))
