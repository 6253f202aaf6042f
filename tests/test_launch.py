"""Launching at scale: the accelerate configs of configs/accelerate/ and what the trainer checks at start."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType
from helpers import single_thread_env, tiny_overrides

from sit_atconv.cli import check_launch
from sit_atconv.models.loading import load_model
from sit_atconv.training import load_config
from sit_atconv.training.trainer import start_run

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "configs" / "accelerate"
DEMO = ROOT / "configs" / "demo" / "digits.yaml"

# (num_machines, processes per machine) of each config: a new file must be added here.
LAYOUTS = {
    "1gpu.yaml": (1, 1),
    "8gpu.yaml": (1, 8),
    "2nodes_8gpu.yaml": (2, 8),
    "cpu_2proc.yaml": (1, 2),
}
GPU_CONFIGS = [name for name in LAYOUTS if name != "cpu_2proc.yaml"]


def launch_args(*argv: str):
    """`accelerate launch *argv` resolved as the launcher resolves it (the config file merged with the
    command line), without starting anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(list(argv)))
    return args


def test_the_configs_are_the_listed_ones():
    assert sorted(p.name for p in ACCELERATE.glob("*.yaml")) == sorted(LAYOUTS)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_config_parses_with_accelerate_and_its_process_counts_agree(name):
    config = load_config_from_file(str(ACCELERATE / name))  # raises on keys this accelerate does not know
    assert isinstance(config, ClusterConfig)
    machines, per_machine = LAYOUTS[name]
    assert config.num_machines == machines
    assert config.num_processes == machines * per_machine
    assert config.machine_rank == 0
    if config.num_processes > 1:
        assert config.distributed_type == DistributedType.MULTI_GPU  # train.parallel decides ddp or fsdp
    else:
        assert config.distributed_type == DistributedType.NO


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_use_bf16(name):
    assert load_config_from_file(str(ACCELERATE / name)).mixed_precision == "bf16"


def test_cpu_config_hides_gpus_and_runs_in_float32():
    config = load_config_from_file(str(ACCELERATE / "cpu_2proc.yaml"))
    assert config.mixed_precision == "no" and config.use_cpu
    # gpu_ids becomes CUDA_VISIBLE_DEVICES, where -1 leaves no device visible to torch
    assert config.gpu_ids == "-1,-1"


def test_two_node_config_takes_rank_and_address_from_the_command_line():
    """What the README's node and SLURM commands pass: one file for both nodes."""
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = str(ACCELERATE / "2nodes_8gpu.yaml")
    args = launch_args("--config_file", config, "--machine_rank", "1", "--main_process_ip", "10.1.2.3", "train_sit.py")
    prepare_multi_gpu_env(args)  # the torchrun arguments of this node
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", "10.1.2.3:29500")


@pytest.mark.parametrize(
    ("local", "world", "devices", "expected"),
    [(2, 2, 1, "num_processes=2 over num_machines=1"), (8, 16, 4, "num_processes=16 over num_machines=2")],
)
def test_more_processes_than_gpus_is_one_clear_error(tmp_path, monkeypatch, local, world, devices, expected):
    """Raised before Accelerate starts (whose own error would be an invalid device ordinal), naming the
    processes, the devices and the setting to change."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    config = load_config(DEMO, tiny_overrides(tmp_path / "run"))
    with pytest.raises(ValueError, match=f"started {local} processes on this node") as error:
        start_run(config, tmp_path / "run")
    message = str(error.value)
    assert expected in message and f"only {devices} CUDA device(s)" in message
    assert f"at most {devices * world // local}" in message and "--num_processes" in message


def test_as_many_processes_as_gpus_passes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    check_launch()


def test_accelerates_fsdp_plugin_is_refused_with_what_to_use(tmp_path, monkeypatch):
    """The trainer shards the model itself (train.parallel=fsdp); Accelerate's plugin would wrap it a second
    time, behind its back and on GPUs only."""
    import accelerate

    class FSDPAccelerator:
        def __init__(self, **kwargs):
            self.distributed_type = DistributedType.FSDP

    monkeypatch.setattr(accelerate, "Accelerator", FSDPAccelerator)
    with pytest.raises(ValueError, match="distributed_type: FSDP .*8gpu.yaml.*train.parallel=fsdp"):
        start_run(load_config(DEMO, tiny_overrides(tmp_path / "run")), tmp_path / "run")


@pytest.mark.slow
def test_cpu_2proc_config_trains_in_two_processes_and_its_checkpoint_loads_in_one(tmp_path):
    """`accelerate launch --config_file configs/accelerate/cpu_2proc.yaml train_sit.py ...`, as a user types
    it: both processes join (each writes its RNG state into the checkpoint), and the checkpoint loads in
    this single process."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, steps=2, **{"checkpoint.every": 2})
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "cpu_2proc.yaml")]
    command += ["train_sit.py", "--config", str(DEMO), *overrides, "--no-progress"]
    proc = subprocess.run(command, capture_output=True, text=True, env=single_thread_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    assert f"checkpoint: {checkpoint}" in proc.stdout  # printed by the main process only
    assert proc.stdout.count("checkpoint: ") == 1
    assert sorted(p.name for p in checkpoint.glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]  # world size 2
    for ema in (True, False):
        model = load_model(checkpoint, ema=ema)
        assert model.config.hidden_size == 32 and len(model.blocks) == 2
        x = torch.randn(2, model.config.in_channels, 8, 8)
        with torch.no_grad():
            out = model(x, torch.rand(2), torch.tensor([1, 2]))
        assert out.shape[0] == 2 and torch.isfinite(out).all()
