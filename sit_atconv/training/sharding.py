"""train.parallel=fsdp: the trainer shards the model itself with torch's FSDP2 (`fully_shard` over a 1-D device
mesh of all processes), as torchtitan does, instead of through Accelerate's FSDP plugin, which applies on GPUs
only. So the same code runs, and is tested, on CPU processes (gloo) and on GPUs (nccl).

What is sharded, per process, 1/world of it: the weights (fp32), their gradients, AdamW's two moments and the EMA.
Each SiT block is one FSDP unit (its weights gathered for its forward and again for its backward), the rest of
the SiT and REPA's projector form the root unit. The EMA is sharded the same way, so its update is one foreach
lerp over the local shards; samplers get a gathered copy (`gathered_copy`).

Mixed precision: with train.mixed_precision=bf16 the weights are gathered in bf16 and the gradients reduced in
fp32 (`MixedPrecisionPolicy`); the forward still runs under Accelerate's autocast, and FSDP does not cast the
modules' inputs, so the timesteps, the residual stream and the norms stay fp32 as they do under DDP.

Checkpoints (training/checkpoint.py): `sharded/` written with torch.distributed.checkpoint (each process its
shards of the weights, the EMA and the optimizer; read back by any number of processes), next to the `model/`
and `ema/` folders gathered on the main process, which sample.py and the pipeline export read as from a DDP run.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sit_atconv.errors import UserError

SHARDED = "sharded"  # the checkpoint's torch.distributed.checkpoint folder


@contextmanager
def process_group(device: torch.device):
    """The process group FSDP shards over: the launcher's (`accelerate launch`, torchrun), or for a single
    process one of its own, removed on exit."""
    if dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():  # (Accelerator.end_training removes it at the end of a run)
            dist.destroy_process_group()


def shard(module: nn.Module, ema: nn.Module, device: torch.device, mixed_precision: str) -> None:
    """Apply FSDP2 in place: each block of `module.model` (the SiT) and of `ema` is a unit, then the roots.
    The modules must already be on `device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = getattr(module.model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise UserError(
            f"train.parallel=fsdp: the model ({type(module.model).__name__}) has no blocks to shard; "
            "use train.parallel=ddp"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    else:
        policy = MixedPrecisionPolicy(cast_forward_inputs=False)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    for block in ema.blocks:  # the EMA is only read (sampling) and lerped: fp32, the model's layout
        fully_shard(block, mesh=mesh)
    fully_shard(ema, mesh=mesh)
    # The SiT's output is a view (the unpatchified tensor); FSDP warns that an in-place op on it would skip its
    # backward hook. The loss only reads it.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded parameter (a DTensor); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a DTensor (a collective for sharded ones); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce-scatter the gradients in this backward or not (off for all but the last micro-batch of a step,
    as DDP's no_sync; a no-op for unsharded models)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


def unsharded_class(module: nn.Module) -> type:
    """The model class behind FSDP2's dynamic subclass (FSDP<Class>)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def full_state_dict(module: nn.Module, main_only: bool) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded module (a collective: every process calls it): on the CPU of the main
    process only (`main_only`, the others get {}), or on every process's device."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=main_only))


def gathered_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """An unsharded copy of a sharded SiT on every process (a collective), in eval mode, for the samplers;
    an unsharded model is returned as it is."""
    if not is_sharded(model):
        return model
    weights = full_state_dict(model, main_only=False)
    with torch.device(device):
        copy = unsharded_class(model).from_config(model.config)
    copy.load_state_dict(weights)
    return copy.requires_grad_(False).eval()


def save_pretrained_from(model: nn.Module, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """`save_pretrained` of a sharded diffusers model from its gathered `weights` (`full_state_dict`). The
    unsharded copy is built on the meta device and takes the gathered tensors: no second set of weights."""
    with torch.device("meta"):
        copy = unsharded_class(model).from_config(model.config)
    copy.load_state_dict(weights, assign=True)
    copy.save_pretrained(folder)


def training_state(module: nn.Module, ema: nn.Module, optimizer) -> dict:
    """{"model", "ema", "optimizer"}: the sharded state dicts torch.distributed.checkpoint writes and reads
    (optimizer state keyed by parameter name)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {
        "model": get_model_state_dict(module),
        "ema": get_model_state_dict(ema),
        "optimizer": get_optimizer_state_dict(module, inner_optimizer(optimizer)),
    }


def save_sharded(folder: Path, module: nn.Module, ema: nn.Module, optimizer) -> None:
    """Each process writes its shards of the weights, EMA and optimizer into `folder` (a collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(training_state(module, ema, optimizer), checkpoint_id=folder)


def load_sharded(folder: Path, module: nn.Module, ema: nn.Module, optimizer) -> None:
    """Read a `save_sharded` folder into sharded or unsharded modules, whatever the number of processes that
    wrote it (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = training_state(module, ema, optimizer)
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(module, state["model"])
    set_model_state_dict(ema, state["ema"])
    set_optimizer_state_dict(module, inner_optimizer(optimizer), state["optimizer"])


def load_optimizer_sharded(folder: Path, module: nn.Module, optimizer) -> None:
    """Only the optimizer of a `save_sharded` folder (an unsharded run resuming a sharded checkpoint, whose
    weights it reads from the gathered model/ and ema/ folders)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(module, inner_optimizer(optimizer))}
    with warnings.catch_warnings():  # one process without a process group reads the whole of every shard
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder)
    set_optimizer_state_dict(module, inner_optimizer(optimizer), state["optimizer"])


def load_full_into_sharded(module: nn.Module, ema: nn.Module, optimizer, weights: dict, ema_weights: dict, state: dict):
    """A checkpoint of an unsharded run into sharded modules: `weights` the whole TrainModule's state dict,
    `ema_weights` the EMA's, `state` the optimizer's state dict as `optimizer.state_dict()` wrote it (parameters
    by position, in the order of the parameter groups, which is the same whatever the sharding)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, weights, options=whole)
    set_model_state_dict(ema, ema_weights, options=whole)
    inner = inner_optimizer(optimizer)
    names = {id(p): name for name, p in module.named_parameters()}
    order = [names[id(p)] for group in inner.param_groups for p in group["params"]]
    by_name = {
        "state": {order[int(index)]: value for index, value in state["state"].items()},
        "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(module, inner, by_name, options=whole)


def inner_optimizer(optimizer):
    """The torch optimizer under Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
