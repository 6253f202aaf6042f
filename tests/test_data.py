"""Image folders (ADM crop, bad files), latent extraction (tiny random VAE) and the latent data set."""

import json

import helpers
import numpy as np
import pytest
import torch
from PIL import Image

from sit_atconv.data.images import ImageFolderDataset, center_crop_arr
from sit_atconv.data.latents import LatentDataset, extract_latents


def write_image(path, size=(40, 30), color=(200, 10, 50)):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:] = color
    array[:, : size[0] // 2, 0] = 0  # left half differs, so flips are visible
    Image.fromarray(array).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for label, name in enumerate(["cat", "dog"]):
        for i in range(3):
            write_image(root / name / f"{i}.png", color=(50 + 100 * label, 20 * i, 30))
    (root / "dog" / "corrupt.jpg").write_bytes(b"definitely not a jpeg")
    return root


def test_center_crop_follows_adm():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    out = center_crop_arr(image, 64)
    assert out.shape == (64, 64, 3)
    # ADM: BOX-halve 500x300 -> 250x150 -> 125x75 (while the short side >= 128), BICUBIC to a short side
    # of 64, centre crop.
    halved = image.resize((250, 150), resample=Image.BOX).resize((125, 75), resample=Image.BOX)
    resized = np.asarray(halved.resize((round(125 * 64 / 75), 64), resample=Image.BICUBIC))
    left = (resized.shape[1] - 64) // 2
    assert np.array_equal(out, resized[:, left : left + 64])


def test_image_folder_labels_and_bad_files(folder, caplog):
    dataset = ImageFolderDataset(folder, resolution=16)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 7
    image, label, index = dataset[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 0
    corrupt = dataset.files.index(folder / "dog" / "corrupt.jpg")
    assert dataset[corrupt] == (None, None, corrupt)
    assert "corrupt.jpg" in caplog.text
    with pytest.raises(ValueError, match="cannot read image .*corrupt.jpg"):  # a UserError
        ImageFolderDataset(folder, 16, on_error="abort")[corrupt]


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", 16)
    flat = tmp_path / "flat"
    write_image(flat / "a.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(flat, 16)
    assert len(ImageFolderDataset(flat, 16, unconditional=True)) == 1
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="contains no images"):
        ImageFolderDataset(tmp_path / "empty", 16)


@pytest.fixture
def tiny_vae():
    return helpers.tiny_vae()


def test_extract_and_read_latents(folder, tiny_vae, tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    dataset = ImageFolderDataset(folder, 16)
    out = tmp_path / "latents"
    manifest = extract_latents(
        accelerator, dataset, tiny_vae, out, shard_size=3, batch_size=2, flip=True, num_workers=0, progress=False
    )
    assert manifest["total_rows"] == 6 and manifest["skipped_images"] == 1 and len(manifest["shards"]) == 3
    assert "corrupt.jpg" in (out / "skipped_0.txt").read_text()

    latents = LatentDataset(out)
    assert len(latents) == 12 and latents.num_classes == 2
    mean, std, label, image = latents[0]
    assert mean.shape == (4, 8, 8) and (std > 0).all() and image.shape == (3, 16, 16)
    with torch.no_grad():
        posterior = tiny_vae.encode(dataset[0][0][None].float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(mean, posterior.mean[0].half().float())
    _, _, _, mirrored = latents[6]
    assert torch.equal(mirrored, image.flip(-1))

    # Resume: a lost shard (and an unfinished manifest) is redone, the others are left alone.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.safetensors")}
    (out / "shard_000001.safetensors").unlink()
    (out / "manifest.json").unlink()
    extract_latents(
        accelerator, dataset, tiny_vae, out, shard_size=3, batch_size=2, flip=True, num_workers=0, progress=False
    )
    assert (out / "shard_000000.safetensors").stat().st_mtime_ns == stamps["shard_000000.safetensors"]
    assert len(LatentDataset(out)) == 12


def test_latent_folder_errors(folder, tiny_vae, tmp_path):
    from accelerate import Accelerator

    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        LatentDataset(tmp_path)
    out = tmp_path / "latents"
    extract_latents(
        Accelerator(cpu=True),
        ImageFolderDataset(folder, 16),
        tiny_vae,
        out,
        shard_size=4,
        batch_size=4,
        num_workers=0,
        progress=False,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["rows"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="has 4 rows but .* says 99"):
        LatentDataset(out)


def test_digit_scorer_reads_real_digits():
    from sit_atconv.data.digits import DigitsDataset, score_digit_samples
    from sit_atconv.data.images import to_uint8_nhwc

    data = DigitsDataset(resolution=16)
    images = to_uint8_nhwc(data.images[:300]).numpy()
    labels = data.labels[:300].numpy()
    assert score_digit_samples(images, labels) > 0.97  # trained on these: near perfect
    assert score_digit_samples(images, (labels + 1) % 10) < 0.05
