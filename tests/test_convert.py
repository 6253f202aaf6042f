"""Checkpoint import: official key layouts and time conventions -> our SiT, against literal re-implementations
of the source models (tests/official_reference.py) with random weights."""

import argparse
import copy
import json

import pytest
import torch
from official_reference import OfficialSiT, randomise
from safetensors.torch import load_file

from sit_atconv.convert import convert_checkpoint, time_reversal_rotation
from sit_atconv.convert.__main__ import main as convert_main
from sit_atconv.models import SiT, create_model
from sit_atconv.pipelines import SiTPipeline
from sit_atconv.repa import build_projector
from sit_atconv.training import init_weights

TINY = dict(hidden_size=32, depth=2, num_heads=2)


def official(flavour, mixers, pos_embed=True, z_dim=0, seed=0, **options):
    size = dict(input_size=8, patch=2, in_channels=4, hidden=32, heads=2, num_classes=10)
    model = OfficialSiT(**{**size, **options}, mixers=mixers, flavour=flavour, pos_embed=pos_embed, z_dim=z_dim)
    return randomise(model, seed).eval()


def inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, 8, 8, generator=gen)
    t = torch.tensor([0.0, 0.1, 0.35, 0.5, 0.9, 1.0])
    y = torch.tensor([0, 3, 9, 10, 5, 10])  # 10 is the null class
    return x, t, y


def trainer_checkpoint(path, ema, online):
    torch.save(
        {
            "model": online.state_dict(),
            "ema": ema.state_dict(),
            "opt": {"state": {}},
            "args": argparse.Namespace(model="SiT-S/2", lr=1e-4),
            "steps": 7,
        },
        path,
    )


@torch.no_grad()
def assert_sit_convention(ours, reference):
    """v_ours(x, t) = -v_SiT(x, 1 - t): SiT's t = 1 is data and its target is x_data - x_noise."""
    x, t, y = inputs()
    expected = -reference(x, 1 - t, y)
    assert torch.allclose(ours(x, t, y), expected, atol=2e-5, rtol=1e-4), (ours(x, t, y) - expected).abs().max()


@torch.no_grad()
def assert_same_convention(ours, reference):
    x, t, y = inputs()
    assert torch.allclose(ours(x, t, y), reference(x, t, y), atol=2e-5, rtol=1e-4)


def test_rotation_maps_the_embedding_of_t_to_that_of_one_minus_t():
    from sit_atconv.models.sit import timestep_embedding

    t = torch.linspace(0, 1, 11)
    rotated = timestep_embedding(t, 256).double() @ time_reversal_rotation(256).T
    assert torch.allclose(rotated, timestep_embedding(1 - t, 256).double(), atol=1e-5)


def test_released_sit_state_dict(tmp_path):
    reference = official("sit", ["attention"] * 2)
    torch.save(reference.state_dict(), tmp_path / "SiT-XL-2-256x256.pt")  # released files are bare state dicts
    converted = convert_checkpoint(tmp_path / "SiT-XL-2-256x256.pt", "sit", "SiT-S/2", **TINY)
    assert converted.convention == "sit" and converted.online is None and converted.projector_state is None
    assert converted.model.config.learn_sigma and converted.model.config.input_size == 8
    assert converted.model.config.num_classes == 10
    assert_sit_convention(converted.model, reference)


def test_sit_trainer_checkpoint_keeps_both_weight_sets(tmp_path):
    ema, online = official("sit", ["attention"] * 2), official("sit", ["attention"] * 2, seed=5)
    trainer_checkpoint(tmp_path / "0001000.pt", ema, online)
    converted = convert_checkpoint(tmp_path / "0001000.pt", "sit", "SiT-S/2", **TINY)
    assert_sit_convention(converted.model, ema)
    assert_sit_convention(converted.online, online)
    no_ema = convert_checkpoint(tmp_path / "0001000.pt", "sit", "SiT-S/2", ema=False, **TINY)
    assert_sit_convention(no_ema.model, online)


def test_noise_prediction_keeps_its_sign(tmp_path):
    reference = official("sit", ["attention"] * 2)
    torch.save(reference.state_dict(), tmp_path / "noise.pt")
    converted = convert_checkpoint(tmp_path / "noise.pt", "sit", "SiT-S/2", prediction="noise", **TINY)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.allclose(converted.model(x, t, y), reference(x, 1 - t, y), atol=2e-5, rtol=1e-4)


def test_repa_checkpoint_with_projector(tmp_path):
    ema = official("repa", ["attention"] * 2, z_dim=12)
    online = official("repa", ["attention"] * 2, z_dim=12, seed=3)
    trainer_checkpoint(tmp_path / "last.pt", ema, online)
    converted = convert_checkpoint(tmp_path / "last.pt", "repa", "SiT-S/2", **TINY)
    assert converted.convention == "repa" and not converted.model.config.learn_sigma
    assert_same_convention(converted.model, ema)
    projector = online.projectors[0]  # the projector that trains with the online weights
    assert set(converted.projector_state) == {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    for i in (0, 2, 4):
        assert torch.equal(converted.projector_state[f"{i}.weight"], projector[i].weight)


def test_official_atconv_sit_code_pure_and_hybrid(tmp_path):
    pure = official("sit", ["atconv"] * 2, pos_embed=False)  # no position embedding, as upstream
    torch.save({"ema": pure.state_dict()}, tmp_path / "pure.pt")
    converted = convert_checkpoint(tmp_path / "pure.pt", "atconv-official", "SiT-ATConv-S/2", input_size=8, **TINY)
    config = converted.model.config
    options = config.mixer_options["atconv"]
    assert (config.pos_embed, options["context_pool"], options["kernel_act"]) == ("none", "raster", "gelu_tanh")
    assert_sit_convention(converted.model, pure)

    hybrid = official("sit", ["attention", "atconv"])  # ATConv in every other block, position embedding kept
    torch.save({"ema": hybrid.state_dict()}, tmp_path / "hybrid.pt")
    converted = convert_checkpoint(tmp_path / "hybrid.pt", "atconv-official", "SiT-Hybrid-S/2", **TINY)
    assert converted.model.config.pos_embed == "sincos"
    assert_sit_convention(converted.model, hybrid)


def test_label_tables_with_and_without_a_null_class(tmp_path):
    """The official ATConv SiT code trains without label dropout by default (FFHQ: one class, one row)."""
    ffhq = official("sit", ["atconv"] * 2, pos_embed=False, num_classes=1, null_class=False)
    trainer_checkpoint(tmp_path / "ffhq.pt", ffhq, ffhq)
    converted = convert_checkpoint(tmp_path / "ffhq.pt", "atconv-official", "SiT-ATConv-S/2", input_size=8, **TINY)
    config = converted.model.config
    assert (config.num_classes, config.class_dropout_prob, converted.model.null_class) == (1, 0.0, None)
    x, t, _ = inputs()
    zeros = torch.zeros(len(x), dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(converted.model(x, t, zeros), -ffhq(x, 1 - t, zeros), atol=2e-5, rtol=1e-4)

    no_null = official("sit", ["attention"] * 2)
    no_null.y_embedder.embedding_table = torch.nn.Embedding(10, 32)  # 10 classes, trained without dropout
    torch.save(no_null.state_dict(), tmp_path / "no_null.pt")
    converted = convert_checkpoint(tmp_path / "no_null.pt", "sit", "SiT-S/2", num_classes=10, **TINY)
    assert (converted.model.config.num_classes, converted.model.null_class) == (10, None)
    with pytest.raises(ValueError, match="label table has 10 rows, which does not fit 7 classes"):
        convert_checkpoint(tmp_path / "no_null.pt", "sit", "SiT-S/2", num_classes=7, **TINY)


def test_official_atconv_repa_code(tmp_path):
    reference = official("repa", ["attention", "atconv"], z_dim=12)  # 1x1 convs, SiLU, REPA's time convention
    torch.save({"ema": reference.state_dict(), "args": argparse.Namespace(use_atconv=True)}, tmp_path / "r.pt")
    converted = convert_checkpoint(tmp_path / "r.pt", "atconv-official", "SiT-Hybrid-S/2", **TINY)
    assert converted.convention == "repa" and converted.model.config.mixer_options["atconv"]["kernel_act"] == "silu"
    assert_same_convention(converted.model, reference)
    assert converted.projector_state is not None


def test_wrong_model_size_names_the_file_and_the_expectation(tmp_path):
    torch.save(official("sit", ["attention"] * 2).state_dict(), tmp_path / "small.pt")
    with pytest.raises(
        ValueError,
        match=r"small\.pt does not hold a SiT-B/2: depth: 2 there, 12 expected; hidden_size: 32 there, 768 expected",
    ):
        convert_checkpoint(tmp_path / "small.pt", "sit", "SiT-B/2")
    with pytest.raises(ValueError, match="mixers: attention in all 2 blocks there, atconv in all 2 blocks expected"):
        convert_checkpoint(tmp_path / "small.pt", "sit", "SiT-ATConv-S/2", **TINY)


def test_bad_files_and_sources(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt as a PyTorch checkpoint"):
        convert_checkpoint(tmp_path / "junk.pt", "sit", "SiT-S/2")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        convert_checkpoint(tmp_path / "missing.pt", "sit", "SiT-S/2")
    with pytest.raises(ValueError, match="unknown checkpoint source 'dit'"):
        convert_checkpoint(tmp_path / "junk.pt", "dit", "SiT-S/2")
    torch.save({"opt": {}, "steps": 3}, tmp_path / "no_weights.pt")
    with pytest.raises(ValueError, match=r"no 'ema' weights; its entries are \['opt', 'steps'\]"):
        convert_checkpoint(tmp_path / "no_weights.pt", "repa", "SiT-S/2")
    state = official("sit", ["attention"] * 2).state_dict()
    state["pos_embed"] = state["pos_embed"] + 0.5  # a learned embedding: not something we recompute
    torch.save(state, tmp_path / "learned_pos.pt")
    with pytest.raises(ValueError, match="pos_embed is not the fixed 2-D sin-cos"):
        convert_checkpoint(tmp_path / "learned_pos.pt", "sit", "SiT-S/2", **TINY)
    del state["blocks.1.mlp.fc2.weight"]
    state["pos_embed"] = state["pos_embed"] - 0.5
    torch.save(state, tmp_path / "truncated.pt")
    with pytest.raises(
        ValueError, match=r"truncated\.pt does not fit the model: missing \['blocks.1.mlp.fc2.weight'\]"
    ):
        convert_checkpoint(tmp_path / "truncated.pt", "sit", "SiT-S/2", **TINY)


def test_cli_writes_a_pipeline_that_samples_and_continues_training(tmp_path, capsys):
    """Full S/2 width (the CLI takes registry sizes), 8x8 latents: convert a REPA hybrid checkpoint,
    load it as a pipeline, and start training from it."""
    size = dict(input_size=8, patch=2, in_channels=4, hidden=384, heads=6, num_classes=10, flavour="repa")
    mixers = ["atconv" if i % 2 else "attention" for i in range(12)]
    ema = randomise(OfficialSiT(mixers=mixers, z_dim=24, **size), std=0.02).eval()
    online = randomise(OfficialSiT(mixers=mixers, z_dim=24, **size), seed=1, std=0.02).eval()
    trainer_checkpoint(tmp_path / "last.pt", ema, online)
    with open(tmp_path / "names.json", "w") as f:
        json.dump([f"class {i}" for i in range(10)], f)
    out = tmp_path / "converted"
    names = str(tmp_path / "names.json")
    convert_main(
        ["--from", "atconv-official", str(tmp_path / "last.pt"), "--model", "SiT-Hybrid-S/2", "--out", str(out)]
        + ["--id2label", names]
    )
    assert "REPA" not in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "model",
        "model_index.json",
        "pipeline_sit_atconv.py",
        "projector.safetensors",
        "scheduler",
        "transformer",
    ]
    card = (out / "README.md").read_text()
    assert "Converted from atconv-official checkpoint last.pt" in card and "# SiT-Hybrid-S/2" in card
    assert load_file(out / "projector.safetensors")["4.weight"].shape == (24, 16)

    pipe = SiTPipeline.from_pretrained(out)
    assert pipe.id2label[3] == "class 3" and pipe.config.transport == {
        "interpolant": "linear",
        "prediction": "velocity",
    }
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.allclose(pipe.transformer(x, t, y), ema(x, t, y), atol=2e-5, rtol=1e-4)
    latents = pipe(class_labels=["Class 1", 2], num_inference_steps=2, output_type="latent").images
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()

    # train.init_from: online weights from model/, EMA from transformer/, the projector that trained with them
    sit = SiT.from_config(pipe.transformer.config)
    ema_copy = copy.deepcopy(sit)
    projector = build_projector(384, 24, 16)
    assert init_weights(out, sit, ema_copy, projector) == []
    with torch.no_grad():
        assert torch.allclose(sit.eval()(x, t, y), online(x, t, y), atol=2e-5, rtol=1e-4)
        assert torch.allclose(ema_copy.eval()(x, t, y), ema(x, t, y), atol=2e-5, rtol=1e-4)
    assert torch.equal(projector[4].weight, online.projectors[0][4].weight)
    with pytest.raises(ValueError, match="mixer_options.atconv.context_pool: 'raster' there, '2d' expected"):
        init_weights(
            out,
            create_model(
                "SiT-Hybrid-S/2",
                input_size=8,
                num_classes=10,
                learn_sigma=False,
                mixer_options={"atconv": {"kernel_act": "silu"}},
            ),
            ema_copy,
            None,
        )

    with pytest.raises(SystemExit):  # unknown --from: argparse names the choices
        convert_main(["--from", "dit", str(tmp_path / "last.pt"), "--model", "SiT-S/2", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'dit'" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="already exists"):
        convert_main(["--from", "repa", str(tmp_path / "last.pt"), "--model", "SiT-Hybrid-S/2", "--out", str(out)])
