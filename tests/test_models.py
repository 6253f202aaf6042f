"""SiT family: registry, parameter counts (paper Table VIII), forward contract, embeddings, init, errors."""

import inspect
import math

import numpy as np
import pytest
import torch
from helpers import randomise, tiny_sit

from sit_atconv.models import SiT, create_model, list_models, model_config
from sit_atconv.models.mixers import Attention
from sit_atconv.models.sit import sincos_pos_embed_2d, timestep_embedding
from sit_atconv.ops import ATConv, DWConv

TABLE_VIII = {
    "SiT-B/2": 130_315_808,
    "SiT-ATConv-B/2": 123_239_000,
    "SiT-Hybrid-B/2": 126_777_404,
    "SiT-L/2": 457_840_672,
    "SiT-ATConv-L/2": 432_677_008,
    "SiT-XL/2": 674_834_720,
    "SiT-ATConv-XL/2": 637_678_328,
}


def tiny(name: str = "SiT-Hybrid-S/2", **overrides) -> SiT:
    """A fresh (adaLN-Zero) 4-block tiny SiT."""
    return tiny_sit(name, std=0, **{"depth": 4, "num_heads": 4, **overrides})


@pytest.mark.parametrize("name,expected", TABLE_VIII.items())
def test_trainable_parameters_match_table_viii(name, expected):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_registry_names():
    names = list_models()
    assert len(names) == 36 and len(set(names)) == 36
    for family in ("SiT", "SiT-ATConv", "SiT-Hybrid"):
        for size in ("S", "B", "L", "XL"):
            for patch in (2, 4, 8):
                assert f"{family}-{size}/{patch}" in names
    assert model_config("SiT-XL/4")["patch_size"] == 4
    assert model_config("SiT-L/2")["depth"] == 24


def test_unknown_model_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model 'SiT-XXL/2'.*SiT-ATConv-XL/2"):
        create_model("SiT-XXL/2")


def test_unknown_override_names_the_valid_fields():
    with pytest.raises(TypeError, match=r"unknown SiT config field\(s\) \['dpth'\]; valid fields: input_size"):
        create_model("SiT-S/2", dpth=3)


def test_mixer_layouts():
    assert tiny("SiT-S/2").mixers == ["attention"] * 4
    assert tiny("SiT-ATConv-S/2").mixers == ["atconv"] * 4
    hybrid = create_model("SiT-Hybrid-B/2", input_size=8, num_classes=0, hidden_size=32, num_heads=4)
    assert [i for i, kind in enumerate(hybrid.mixers) if kind == "atconv"] == [1, 3, 5, 7, 9, 11]
    for block, kind in zip(hybrid.blocks, hybrid.mixers, strict=True):
        assert isinstance(block.mixer, ATConv if kind == "atconv" else Attention)
    custom = tiny(mixers=["atconv", "atconv", "attention", "atconv"])
    assert [type(b.mixer) for b in custom.blocks] == [ATConv, ATConv, Attention, ATConv]


def test_atconv_family_has_no_position_embedding():
    assert tiny("SiT-ATConv-S/2").position_embedding(4, 4) is None
    assert tiny("SiT-Hybrid-S/2").position_embedding(4, 4).shape == (1, 16, 32)
    assert not any("pos_embed" in key for key in tiny("SiT-S/2").state_dict())  # fixed, so not saved


@pytest.mark.parametrize("name", ["SiT-S/2", "SiT-ATConv-S/4", "SiT-Hybrid-S/2"])
@pytest.mark.parametrize("size", [(8, 8), (16, 8), (12, 20)])
def test_forward_shapes_any_divisible_size(name, size):
    model = randomise(tiny(name)).eval()
    patch = model.config.patch_size
    if size[0] % patch or size[1] % patch:
        pytest.skip("size not divisible by this patch size")
    x = torch.randn(2, 4, *size)
    out = model(x, torch.rand(2), torch.tensor([3, 10]))  # 10 = null class
    assert out.shape == x.shape  # learn_sigma: only the first in_channels are returned
    assert torch.isfinite(out).all()


def test_unconditional_and_no_learn_sigma():
    model = randomise(tiny(num_classes=0, learn_sigma=False, in_channels=3)).eval()
    assert model.y_embedder is None and model.null_class is None
    assert model.final_layer.linear.out_features == 2 * 2 * 3
    assert model(torch.randn(2, 3, 8, 8), torch.tensor(0.5)).shape == (2, 3, 8, 8)


def test_conditional_model_needs_labels():
    with pytest.raises(ValueError, match="class-conditional"):
        tiny()(torch.randn(1, 4, 8, 8), torch.rand(1))


def test_learn_sigma_returns_first_half():
    model = randomise(tiny()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    captured = {}
    model.final_layer.register_forward_hook(lambda mod, inp, out: captured.update(out=out))
    out = model(x, t, y)
    full = captured["out"].view(2, 4, 4, 2, 2, 8).permute(0, 5, 1, 3, 2, 4).reshape(2, 8, 8, 8)  # (B, 2*in, H, W)
    torch.testing.assert_close(out, full[:, :4])


def test_fresh_model_blocks_are_identity_and_output_zero():
    model = tiny().eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    tokens = model.x_embedder(x) + model.position_embedding(4, 4)
    c = model.t_embedder(t) + model.y_embedder(y)
    for block in model.blocks:
        torch.testing.assert_close(block(tokens, c, (4, 4)), tokens)
    assert torch.count_nonzero(model(x, t, y)) == 0


def test_returned_features_are_the_tokens_after_block_k():
    model = randomise(tiny()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    seen = []
    model.blocks[1].register_forward_hook(lambda mod, inp, out: seen.append(out))
    out, features = model(x, t, y, return_features_after=2)
    torch.testing.assert_close(features, seen[0])
    assert features.shape == (2, 16, 32)
    torch.testing.assert_close(out, model(x, t, y))
    with pytest.raises(ValueError, match=r"return_features_after=5 must be in \[1, 4\]"):
        model(x, t, y, return_features_after=5)


def test_label_dropout_in_training_only():
    model = tiny(class_dropout_prob=1.0).train()
    labels = torch.tensor([0, 5, 9])
    model.train()
    torch.testing.assert_close(model.y_embedder(labels), model.y_embedder.embedding_table.weight[[10, 10, 10]])
    model.eval()
    torch.testing.assert_close(model.y_embedder(labels), model.y_embedder.embedding_table.weight[labels])
    assert model.null_class == 10


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_embedding(t, 8)
    freqs = [10000 ** (-k / 4) for k in range(4)]
    expected = [[math.cos(ti * f) for f in freqs] + [math.sin(ti * f) for f in freqs] for ti in t.tolist()]
    torch.testing.assert_close(emb, torch.tensor(expected))


def test_sincos_position_embedding_matches_literal_formula():
    dim, gh, gw = 16, 3, 5
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    rows = []
    for i in range(gh):
        for j in range(gw):  # first half encodes the column, second half the row (DiT/MAE layout)
            rows.append(np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)]))
    torch.testing.assert_close(sincos_pos_embed_2d(dim, gh, gw), torch.tensor(np.array(rows), dtype=torch.float32))


def test_attention_mixer_matches_softmax_reference():
    attn = Attention(16, num_heads=4)
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        q, k, v = attn.qkv(x).view(2, 10, 3, 4, 4).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
        expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 10, 16))
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_qk_norm_adds_per_head_layernorms():
    model = tiny("SiT-S/2", mixer_options={"attention": {"qk_norm": True}})
    assert "blocks.0.mixer.q_norm.weight" in model.state_dict()
    assert model.blocks[0].mixer.q_norm.normalized_shape == (8,)


def test_initialisation_follows_sit():
    model = tiny()
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    std = model.y_embedder.embedding_table.weight.std().item()
    assert 0.015 < std < 0.025
    atconv = model.blocks[1].mixer
    assert torch.count_nonzero(atconv.value_proj.bias) == 0 and torch.count_nonzero(atconv.gamma) == 0
    bound = math.sqrt(6 / (32 + 32))  # Xavier-uniform limit
    assert atconv.value_proj.weight.abs().max() <= bound


def test_config_round_trip_rebuilds_the_same_architecture():
    model = tiny(
        mixers=["atconv", "attention", "atconv", "atconv"], mixer_options={"atconv": {"context_pool": "raster"}}
    )
    rebuilt = SiT.from_config(model.config)
    assert rebuilt.mixers == model.mixers
    assert rebuilt.blocks[0].mixer.context_pool == "raster"
    assert [k for k in rebuilt.state_dict()] == [k for k in model.state_dict()]


def test_bf16_autocast_forward():
    model = randomise(tiny()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert (out.float() - ref).abs().max() / ref.abs().max() < 5e-2


def test_model_compiles_without_graph_breaks():
    model = randomise(tiny()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y))


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="input_size=10 is not divisible by patch_size=4"):
        tiny("SiT-S/4", input_size=10)
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible by num_heads=4"):
        tiny(hidden_size=30)
    with pytest.raises(ValueError, match="unknown mixer 'conv'"):
        tiny(mixers=["attention", "conv", "attention", "atconv"])
    with pytest.raises(TypeError, match="mixers must be a list"):
        tiny(mixers="atconv")
    with pytest.raises(ValueError, match="mixers has 3 entries but depth=4"):
        tiny(mixers=["atconv"] * 3)
    with pytest.raises(ValueError, match="pos_embed='learned'"):
        tiny(pos_embed="learned")
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer"):
        tiny(mixer_options={"atconv": {"kernel_size": 4}})
    with pytest.raises(ValueError, match=r"input size 9x8 is not divisible by patch_size=2"):
        tiny()(torch.randn(1, 4, 9, 8), torch.rand(1), torch.tensor([0]))


def test_one_architecture_comparison_from_sits_config():
    from sit_atconv.models import architecture_differences, architecture_fields, check_architecture, name_fields

    fields = set(architecture_fields())
    sit_fields = set(inspect.signature(SiT.__init__).parameters) - {"self"}
    assert fields == sit_fields - {"input_size", "class_dropout_prob"}  # follows SiT's config, nothing hand-kept
    base = tiny(mixer_options={"atconv": {"context_pool": "raster"}}).config
    assert architecture_differences(base, dict(base, input_size=16, mixers=tuple(base["mixers"]))) == {}
    changed = dict(base, mixer_options={"atconv": {"context_pool": "2d"}}, depth=3)
    assert architecture_differences(base, changed) == {
        "depth": (4, 3),
        "mixer_options.atconv.context_pool": ("raster", "2d"),
    }
    with pytest.raises(
        ValueError, match=r"not it: depth: 4 there, 3 expected; mixer_options.atconv.context_pool: 'raster'"
    ):
        check_architecture(base, changed, "not it")
    # A registry name fixes size, patch, mixer layout and family defaults, not options or data fields.
    assert set(name_fields("SiT-ATConv-XL/2")) == {
        "depth",
        "hidden_size",
        "num_heads",
        "patch_size",
        "pos_embed",
        "mixers",
    }
    raster = {"atconv": {"context_pool": "raster"}}
    converted = create_model("SiT-ATConv-S/2", mixer_options=raster, learn_sigma=False, num_classes=0).config
    check_architecture(converted, model_config("SiT-ATConv-S/2"), "not a SiT-ATConv-S/2", name_fields("SiT-ATConv-S/2"))
    with pytest.raises(ValueError, match=r"mixers: attention in all 12 blocks there, atconv in blocks 1,3,5,7,9,11 of"):
        check_architecture(model_config("SiT-S/2"), model_config("SiT-Hybrid-S/2"), "x", name_fields("SiT-Hybrid-S/2"))


def test_mixer_table_builds_each_mixer_from_the_sit_config():
    from sit_atconv.models.mixers import MIXERS, build_mixer

    options = {"attention": {"qk_norm": True}, "atconv": {"kernel_size": 5}, "dwconv": {"kernel_size": 7}}
    model = tiny(mixer_options=options, mixers=["attention", "atconv", "dwconv", "atconv"])
    assert set(MIXERS) == {"attention", "atconv", "dwconv"}
    assert isinstance(model.blocks[0].mixer, Attention) and model.blocks[0].mixer.q_norm.normalized_shape == (8,)
    assert isinstance(model.blocks[1].mixer, ATConv) and model.blocks[1].mixer.kernel_size == 5
    assert isinstance(model.blocks[2].mixer, DWConv) and model.blocks[2].mixer.kernel_size == 7
    with pytest.raises(ValueError, match="unknown mixer 'conv'; expected one of"):
        build_mixer("conv", 32, 4, model.config)


def test_a_mixer_option_added_to_the_table_reaches_sit_config_json_and_loading(monkeypatch, tmp_path):
    """CONTRIBUTING's "add a mixer option" recipe, done at run time: one field of the options dataclass, read by the
    builder, is enough for SiT's `mixer_options`, config.json, strict loading and the architecture check."""
    import dataclasses

    from sit_atconv.models import mixers
    from sit_atconv.models.loading import load_model

    options = dataclasses.make_dataclass(
        "AttentionOptions", [("qk_norm", bool, False), ("qkv_bias", bool, True)], frozen=True
    )

    def build(dim, num_heads, o):
        attention = Attention(dim, num_heads, qk_norm=o.qk_norm)
        attention.qkv = torch.nn.Linear(dim, 3 * dim, bias=o.qkv_bias)
        return attention

    monkeypatch.setitem(mixers.MIXERS, "attention", mixers.Mixer(options, build))
    model = tiny(mixers=["attention", "atconv"] * 2, mixer_options={"attention": {"qkv_bias": False}})
    assert model.blocks[0].mixer.qkv.bias is None and model.config.mixer_options["attention"]["qkv_bias"] is False
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.state_dict().keys() == model.state_dict().keys() and loaded.blocks[0].mixer.qkv.bias is None
    with pytest.raises(ValueError, match="mixer_options.attention.qkv_biass"):
        tiny(mixers=["attention", "atconv"] * 2, mixer_options={"attention": {"qkv_biass": False}})


def test_gradient_checkpointing_gives_the_same_outputs_features_and_gradients():
    model = tiny_sit("SiT-Hybrid-S/2").train()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    keep = torch.zeros(3, dtype=torch.bool)

    def run():
        model.zero_grad()
        out, features = model(x, t, y, return_features_after=1, drop_labels=keep)  # REPA's tokens after block 1
        (out.square().mean() + features.square().mean()).backward()
        return out, features, [p.grad.clone() for p in model.parameters()]

    plain = run()
    model.enable_gradient_checkpointing()
    checkpointed = run()
    assert torch.equal(plain[0], checkpointed[0]) and torch.equal(plain[1], checkpointed[1])
    assert all(torch.equal(a, b) for a, b in zip(plain[2], checkpointed[2], strict=True))


def test_layer_norm_statistics_stay_float32_under_bf16_autocast():
    from sit_atconv.models.sit import LayerNorm32

    norm = LayerNorm32(64, elementwise_affine=False, eps=1e-6)
    x = torch.randn(2, 5, 64) * 30 + 100  # a large mean: bf16 statistics would lose most of the signal
    expected = torch.nn.functional.layer_norm(x.double(), (64,), eps=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)  # the residual stream is float32 under autocast
        low = norm(x.bfloat16())
    assert out.dtype == torch.float32 and low.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    bf16_input = torch.nn.functional.layer_norm(x.bfloat16().double(), (64,), eps=1e-6)
    torch.testing.assert_close(low.double(), bf16_input, rtol=2**-8, atol=2**-8)  # only the output is rounded
