"""The Fig. 1 / Fig. 3 analyses against closed forms: static kernels, attention, Laplacian and box kernels,
constant, white and rank-one feature maps; and the two commands on tiny models."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_sit

from sit_atconv.analysis import (
    analyse_operator,
    cer,
    csc,
    feature_curves,
    influence_maps,
    lateral_inhibition,
    make_operator,
    routing_centroids,
    routing_diversity,
    without_modulation,
)
from sit_atconv.analysis.__main__ import main
from sit_atconv.ops import ATConv

LAPLACIAN = torch.tensor([[-1.0, -1, -1], [-1, 8, -1], [-1, -1, -1]], dtype=torch.float64)
BOX = torch.ones(3, 3, dtype=torch.float64)


def gaussian(*shape, seed=0):
    """Seeded N(0, 1) in float64, rounded to float32 so that float32 modules load it exactly."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).double()


def placed(kernel: torch.Tensor, anchor, H: int, W: int) -> torch.Tensor:
    """|kernel| centred on the anchor of an H x W grid, cross-correlation orientation (not flipped)."""
    r = kernel.shape[-1] // 2
    out = torch.zeros(H + 2 * r, W + 2 * r, dtype=kernel.dtype)
    h, w = anchor
    out[h : h + 2 * r + 1, w : w + 2 * r + 1] = kernel.abs()
    return out[r : r + H, r : r + W]


def depthwise(kernel: torch.Tensor, channels: int = 1):
    """A float64 dwconv7 operator (C channels) whose every channel has `kernel` (zero-padded to 7x7)."""
    pad = (7 - kernel.shape[-1]) // 2
    weight = F.pad(kernel, (pad, pad, pad, pad)).expand(channels, 1, 7, 7).clone()
    state = {"conv.weight": weight, "conv.bias": torch.zeros(channels, dtype=torch.float64)}
    return make_operator("dwconv7", channels, state=state).double()


def dense_conv3(weight: torch.Tensor):
    C = weight.shape[0]
    return make_operator("conv3", C, state={"weight": weight, "bias": torch.zeros(C, dtype=torch.float64)}).double()


# ------------------------------------------------------------------------------------------------
# Influence and routing
# ------------------------------------------------------------------------------------------------


def test_static_convolutions_have_their_kernel_as_influence_and_no_routing_diversity():
    kernel = gaussian(7, 7, seed=1)  # asymmetric: a flipped placement would not match
    anchors = [(4, 4), (2, 7)]
    x = gaussian(3, 1, 9, 9)
    result = analyse_operator(depthwise(kernel), x, anchors)
    for k, anchor in enumerate(anchors):
        for b in range(3):
            assert torch.equal(result["influence"][b, k], placed(kernel, anchor, 9, 9))
    assert torch.equal(result["diversity"], torch.zeros(2))
    assert torch.equal(result["map_diversity"], torch.zeros(2))

    # depthwise over channels sums the per-channel kernels; a dense conv sums over (out, in) channel pairs
    kernels = gaussian(3, 1, 7, 7, seed=2)
    op = make_operator("dwconv7", 3, state={"conv.weight": kernels, "conv.bias": torch.zeros(3)}).double()
    G = influence_maps(op, gaussian(2, 3, 9, 9), [(4, 4)])
    torch.testing.assert_close(G[1, 0], placed(kernels.abs().sum(0)[0], (4, 4), 9, 9), rtol=1e-12, atol=0)
    weight = gaussian(3, 3, 3, 3, seed=3)
    result = analyse_operator(dense_conv3(weight), gaussian(2, 3, 9, 9), [(4, 4)])
    torch.testing.assert_close(result["influence"][0, 0], placed(weight.abs().sum((0, 1)), (4, 4), 9, 9))
    assert torch.equal(result["far"], torch.zeros(2, 1))  # a 3x3 kernel reads nothing beyond radius 1.5
    assert torch.equal(result["diversity"], torch.zeros(1))
    # A single output channel c* is one Jacobian row
    G = influence_maps(dense_conv3(weight), gaussian(1, 3, 9, 9), [(4, 4)], out_channels=[2])
    torch.testing.assert_close(G[0, 0], placed(weight[2].abs().sum(0), (4, 4), 9, 9))


def test_routing_centroid_follows_the_kernel_mass():
    x = gaussian(2, 1, 9, 9)
    symmetric = torch.tensor([[1.0, 2, 1], [2, 5, 2], [1, 2, 1]], dtype=torch.float64)
    assert routing_centroids(influence_maps(depthwise(symmetric), x, [(4, 4)]), [(4, 4)]).abs().max() < 1e-12
    right = torch.tensor([[0.0, 1, 3], [0, 1, 3], [0, 1, 3]], dtype=torch.float64)  # mass on the right column
    centroid = routing_centroids(influence_maps(depthwise(right), x, [(4, 4)]), [(4, 4)])[0, 0]
    torch.testing.assert_close(centroid, torch.tensor([0.0, 9 / 12], dtype=torch.float64))  # (3*1 - 0) / (3*1+3*3)
    left = right.flip(-1)
    assert routing_centroids(influence_maps(depthwise(left), x, [(4, 4)]), [(4, 4)])[0, 0, 1] < -0.7
    # only the top-quantile positions count: one big value at offset (0, 2) among small ones elsewhere
    G = torch.full((1, 1, 5, 5), 0.1, dtype=torch.float64)
    G[0, 0, 2, 4] = 10.0
    assert torch.equal(routing_centroids(G, [(2, 2)], quantile=0.99), torch.tensor([[[0.0, 2.0]]], dtype=G.dtype))
    assert routing_centroids(G, [(2, 2)], quantile=0.0)[0, 0, 1] < 2.0


def test_attention_reads_the_whole_grid():
    op = make_operator("attention", 16, heads=2).double()
    result = analyse_operator(op, gaussian(2, 16, 12, 12), [(6, 6), (2, 3)])
    assert (result["influence"] > 0).all()
    assert (result["far"] > 0.8).all()  # the 3x3 neighbourhood is 9 of 144 positions
    assert (result["diversity"] > 0).all()


def test_atconv_routing_depends_on_the_input_and_reaches_beyond_its_kernel():
    op = make_operator("atconv", 8, seed=1).double()
    x = gaussian(3, 8, 9, 9)
    result = analyse_operator(op, x, [(4, 4)])
    beyond = (torch.arange(9)[:, None] - 4) ** 2 + (torch.arange(9)[None] - 4) ** 2 > 1.5**2
    assert (result["influence"][:, 0][:, beyond] > 0).all()  # the pooled context sees every position
    assert (result["far"] > 0).all()
    assert result["diversity"].item() > 0 and result["map_diversity"].item() > 0
    assert routing_diversity(result["centroids"][:1]).item() == 0  # one input: nothing to differ from


def test_lateral_inhibition_of_laplacian_and_box_kernels():
    anchors = [(4, 4), (3, 5)]
    x = gaussian(2, 3, 9, 9)
    ring = lambda li: li[:, 0, 3:6, 3:6].flatten(1)[:, [0, 1, 2, 3, 5, 6, 7, 8]]  # noqa: E731
    for direction in ("ones", "sign"):
        li_map, li = lateral_inhibition(depthwise(LAPLACIAN, channels=3), x, anchors, direction=direction)
        torch.testing.assert_close(ring(li_map), torch.full((2, 8), -1 / 8, dtype=torch.float64))
        torch.testing.assert_close(li, torch.full((2, 2), -1 / 8, dtype=torch.float64))
        assert li_map[0, 0, 4, 4] == pytest.approx(1.0)
    _, li = lateral_inhibition(depthwise(BOX, channels=3), x, anchors)
    torch.testing.assert_close(li, torch.ones(2, 2, dtype=torch.float64))
    # a dense conv mixing channels: the projection on the centre response keeps the sign
    weight = torch.eye(3, dtype=torch.float64)[:, :, None, None] * LAPLACIAN + 0.05 * gaussian(3, 3, 3, 3).abs()
    _, li = lateral_inhibition(dense_conv3(weight), x, anchors)
    assert (li < 0).all()
    _, li = lateral_inhibition(dense_conv3(weight.abs()), x, anchors)
    assert (li > 0).all()


# ------------------------------------------------------------------------------------------------
# Feature statistics
# ------------------------------------------------------------------------------------------------


def test_csc_and_cer_closed_forms():
    assert csc(torch.full((2, 3, 8, 8), 3.7)) < 1e-12
    assert csc(gaussian(4, 8, 16, 16)) > 0.5
    smooth = F.interpolate(gaussian(4, 8, 4, 4), size=(16, 16), mode="bilinear", align_corners=True)
    assert csc(smooth) < 0.3 * csc(gaussian(4, 8, 16, 16))
    assert cer(gaussian(1, 8, 100, 100)) > 0.9
    assert cer(gaussian(1, 8, 100, 100) + 10 * gaussian(8, seed=1)[None, :, None, None]) > 0.9  # covariance: centred
    C = 16
    rank_one = gaussian(3, 1, 8, 8) * gaussian(C, seed=1)[None, :, None, None]  # x[b, :, h, w] = u[b, h, w] v
    assert cer(rank_one) == pytest.approx(1 / C, abs=1e-6)
    two = torch.cat([gaussian(1, 1, 64, 64), gaussian(1, 1, 64, 64, seed=1), torch.zeros(1, 2, 64, 64)], 1)
    assert cer(two) == pytest.approx(2 / 4, abs=0.02)  # two independent unit channels of four


def test_feature_curves_without_modulation():
    model = tiny_sit("SiT-ATConv-S/2", in_channels=4)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ATConv):
                module.gamma.fill_(5.0)
    x0, noise = gaussian(2, 4, 8, 8).float(), gaussian(2, 4, 8, 8, seed=1).float()
    y = torch.zeros(2, dtype=torch.long)
    curves = feature_curves(model, x0, noise, [0.3, 0.7], y)
    plain = feature_curves(without_modulation(model), x0, noise, [0.3, 0.7], y)
    assert curves["blocks"] == [0, 1] and np.array(curves["csc"]).shape == (2, 2)
    assert not np.allclose(curves["csc"], plain["csc"], rtol=1e-3, atol=0)
    assert all(m.modulation == "differential" for m in model.modules() if isinstance(m, ATConv))  # copied
    again = feature_curves(model, x0, noise, [0.3, 0.7], y)
    assert again == curves  # deterministic


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------


def save(model, folder):
    model.save_pretrained(folder)
    return str(folder)


def test_influence_command_on_random_operators(tmp_path):
    weights = tmp_path / "conv3.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": (torch.eye(4)[:, :, None, None] * LAPLACIAN.float()), "bias": torch.zeros(4)}, weights)
    out = tmp_path / "fig" / "fig1.png"
    args = ["influence", "--out", str(out), "--channels", "4", "--heads", "2", "--size", "8", "--num-inputs", "2"]
    record = main([*args, "--anchors", "4,4", "2,5", "--weights", f"conv3={weights}"])
    assert out.is_file() and out.stat().st_size > 0
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(record))
    assert list(record["operators"]) == ["atconv", "attention", "dwconv7", "conv3"]
    for numbers in record["operators"].values():
        assert {"far", "diversity", "map_diversity", "lateral_inhibition", "centroid_distance"} <= set(numbers)
        assert [a["anchor"] for a in numbers["per_anchor"]] == [[4, 4], [2, 5]]
        assert len(numbers["per_anchor"][0]["centroids"]) == 2
    conv = record["operators"]["conv3"]
    assert conv["far"] == 0 and conv["diversity"] == 0
    assert conv["lateral_inhibition"] == pytest.approx(-1 / 8)
    assert record["operators"]["attention"]["far"] > record["operators"]["atconv"]["far"] > 0
    assert record["settings"]["weights"] == {"conv3": str(weights)}
    with pytest.raises(ValueError, match="not among --operators"):
        main([*args, "--operators", "atconv", "--weights", f"conv3={weights}"])


def test_influence_command_on_checkpoint_blocks(tmp_path):
    hybrid = save(tiny_sit("SiT-Hybrid-S/2"), tmp_path / "hybrid")
    out = tmp_path / "blocks.png"
    record = main(["influence", "--ckpt", hybrid, "--out", str(out), "--num-inputs", "2", "--anchors", "2,2"])
    assert list(record["operators"]) == ["block 1 (atconv)"] and out.is_file()
    assert record["settings"]["blocks"] == [1] and record["settings"]["t"] == 0.5
    record = main(["influence", "--ckpt", hybrid, "--block", "0", "--out", str(out), "--num-inputs", "2"])
    assert list(record["operators"]) == ["block 0 (attention)"]
    attention_only = save(tiny_sit("SiT-S/2"), tmp_path / "attention")
    with pytest.raises(ValueError, match=r"has no ATConv blocks \(mixers: attention in all 2 blocks\)"):
        main(["influence", "--ckpt", attention_only, "--out", str(out)])


def test_features_command(tmp_path):
    out = tmp_path / "fig3.png"
    small = ["--model-overrides", "depth=2", "hidden_size=32", "num_heads=2", "input_size=8", "num_classes=10"]
    record = main(["features", "--out", str(out), *small, "--num-inputs", "2", "--t", "0.2", "0.8"])
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["blocks"] == [0, 1]
    assert set(record) == {"blocks", "t", "curves", "settings"} and list(record["curves"]) == ["model"]
    assert np.array(record["curves"]["model"]["cer"]).shape == (2, 2)

    # --compare-modulation on a checkpoint: differs with gamma != 0, equal without modulation
    model = tiny_sit("SiT-ATConv-S/2")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ATConv):
                module.gamma.fill_(5.0)
    compare = ["--num-inputs", "2", "--t", "0.5", "--compare-modulation"]
    record = main(["features", "--ckpt", save(model, tmp_path / "g"), "--out", str(out), *compare])
    assert record["curves"]["model"] != record["curves"]["no_modulation"]
    plain = save(tiny_sit("SiT-ATConv-S/2", mixer_options={"atconv": {"modulation": "none"}}), tmp_path / "none")
    record = main(["features", "--ckpt", plain, "--out", str(out), *compare])
    assert record["curves"]["model"] == record["curves"]["no_modulation"]

    pixels = save(tiny_sit("SiT-ATConv-S/2", in_channels=3), tmp_path / "pixels")
    images = tmp_path / "images.npz"
    np.savez(images, arr_0=np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    record = main(["features", "--ckpt", pixels, "--images", str(images), "--out", str(out), "--t", "0.5"])
    assert record["settings"]["num_inputs"] == 3 and record["settings"]["images"] == str(images)
    grey = save(tiny_sit("SiT-ATConv-S/2", in_channels=1), tmp_path / "grey")  # the digits: grey RGB samples
    record = main(["features", "--ckpt", grey, "--images", str(images), "--out", str(out), "--t", "0.5"])
    assert record["settings"]["num_inputs"] == 3
    with pytest.raises(ValueError, match="model takes 4-channel inputs"):
        main(["features", "--ckpt", save(model, tmp_path / "g2"), "--images", str(images), "--out", str(out)])
    with pytest.raises(ValueError, match=r"has no ATConv blocks \(mixers: attention in all 2 blocks\)"):
        main(["features", "--model", "SiT-S/2", *small, "--out", str(out)])


def test_features_on_latents(tmp_path):
    from helpers import tiny_latent_folder

    latents, _ = tiny_latent_folder(tmp_path)
    model = save(tiny_sit("SiT-ATConv-S/2"), tmp_path / "latent_model")  # 8x8x4 inputs
    out = tmp_path / "fig3.png"
    common = ["features", "--ckpt", model, "--out", str(out), "--num-inputs", "3", "--t", "0.3"]
    record = main([*common, "--latents", str(latents)])
    assert record["settings"]["latents"] == str(latents) and record["settings"]["num_inputs"] == 3
    assert record["curves"] != main(common)["curves"]  # the latents, not Gaussian stand-ins
    grey = save(tiny_sit("SiT-ATConv-S/2", in_channels=1), tmp_path / "grey")
    with pytest.raises(ValueError, match="holds 4-channel latents; the model takes 1"):
        main(["features", "--ckpt", grey, "--out", str(out), "--latents", str(latents)])
