"""The pinned torch/torchvision pair works together (a mismatched torchvision fails on its C++ ops)."""

import torch


def test_torchvision_operators_load_with_this_torch():
    import timm  # noqa: F401  (timm imports torchvision)
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.9], [2.0, 2.0, 3.0, 3.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_package_exports():
    import sit_atconv

    assert {"ATConv", "SiT", "create_model", "list_models"} <= set(sit_atconv.__all__)
