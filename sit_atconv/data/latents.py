"""Pre-computed SD-VAE latents: extraction into sharded safetensors files, and the training data set.

    accelerate launch -m sit_atconv.data.latents --data /imagenet/train --out latents/in256 --resolution 256

Each shard `shard_000123.safetensors` holds, for up to `shard_size` images, the posterior `mean` and
`std` (B, 4, R/8, R/8) in float16 (training draws a fresh latent mean + std * eps each time, like
REPA), `labels`, the dataset `indices`, and the uint8 `images` (B, 3, R, R) REPA's encoder needs; with
--flip also `mean_flipped` and `std_flipped` of the mirrored image. `manifest.json` lists the shards
and their row counts and is written last: a folder without it is unfinished. Re-running skips shards
already written (atomically); unreadable images are skipped and listed in `skipped.txt`.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset

from sit_atconv import vae as autoencoder
from sit_atconv.cli import ArgumentParser, non_negative_int, positive_int, run_cli
from sit_atconv.data.images import ImageFolderDataset, collate_skipping_bad
from sit_atconv.errors import UserError
from sit_atconv.io import atomic_output, check_output_path, write_json_atomic

MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard_{index:06d}.safetensors"


def open_shard(path: Path):
    """`safe_open` of a shard; a truncated or corrupt one (safetensors' message names no file) is a
    ValueError that names it and says how to recover."""
    try:
        return safe_open(path, "pt")
    except SafetensorError as error:
        raise UserError(
            f"latent shard {path} is truncated or corrupt ({error}); delete it and re-run the extraction, "
            "which re-creates missing shards"
        ) from error


@torch.no_grad()
def extract_latents(
    accelerator,
    dataset: ImageFolderDataset,
    vae,
    out: Path,
    shard_size: int = 1024,
    batch_size: int = 64,
    flip: bool = False,
    num_workers: int = 4,
    progress: bool = True,
) -> dict:
    """Encode `dataset` into shards under `out` (processes share shards round-robin) and write the manifest."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    num_shards = (len(dataset) + shard_size - 1) // shard_size
    mine = [k for k in range(num_shards) if k % accelerator.num_processes == accelerator.process_index]
    todo = [k for k in mine if not (out / shard_name(k)).exists()]
    skipped_paths = []
    for k in tqdm(todo, unit="shard", disable=not (progress and accelerator.is_main_process)):
        rows = list(range(k * shard_size, min((k + 1) * shard_size, len(dataset))))
        loader = DataLoader(
            Subset(dataset, rows), batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skipping_bad
        )
        tensors, skipped = encode_shard(loader, vae, accelerator.device, flip)
        skipped_paths += [str(dataset.files[i]) for i in skipped]
        with atomic_output(out / shard_name(k)) as tmp:
            save_file(tensors, tmp)
    if skipped_paths:
        with open(out / f"skipped_{accelerator.process_index}.txt", "a") as f:
            f.writelines(p + "\n" for p in skipped_paths)
    accelerator.wait_for_everyone()
    manifest = (
        write_manifest(out, dataset, num_shards, flip, accelerator.num_processes) if accelerator.is_main_process else {}
    )
    accelerator.wait_for_everyone()
    return manifest


def encode_shard(
    loader: DataLoader, vae, device: torch.device, flip: bool
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The tensors of one shard file (posterior mean/std in float16, labels, indices, uint8 images; the
    mirrored images' posteriors with `flip`) and the dataset indices of the unreadable images."""
    parts: dict[str, list[torch.Tensor]] = {}
    skipped = []
    for batch, bad in loader:
        skipped += bad
        if batch is None:
            continue
        images, labels, indices = batch
        pixels = images.to(device).float() / 127.5 - 1  # [-1, 1]
        encoded = {"": pixels, "_flipped": pixels.flip(-1)} if flip else {"": pixels}
        for suffix, x in encoded.items():
            mean, std = autoencoder.encode(vae, x)
            parts.setdefault("mean" + suffix, []).append(mean.half().cpu())
            parts.setdefault("std" + suffix, []).append(std.half().cpu())
        parts.setdefault("labels", []).append(labels)
        parts.setdefault("indices", []).append(indices)
        parts.setdefault("images", []).append(images)
    tensors = {key: torch.cat(value).contiguous() for key, value in parts.items()}
    if not tensors:  # every image of the shard was unreadable
        tensors = {"labels": torch.zeros(0, dtype=torch.long), "indices": torch.zeros(0, dtype=torch.long)}
    return tensors, skipped


def write_manifest(out: Path, dataset: ImageFolderDataset, num_shards: int, flip: bool, world_size: int) -> dict:
    """manifest.json, written last: the shards and their row counts (main process, once all are written)."""
    shards = []
    for k in range(num_shards):
        with open_shard(out / shard_name(k)) as f:
            shards.append({"file": shard_name(k), "rows": f.get_slice("labels").get_shape()[0]})
    skipped_files = [out / f"skipped_{rank}.txt" for rank in range(world_size)]
    skipped = sum(len(path.read_text().splitlines()) for path in skipped_files if path.exists())
    manifest = {
        "resolution": dataset.resolution,
        "classes": dataset.classes,
        "num_classes": dataset.num_classes,
        "flip": flip,
        "shards": shards,
        "total_rows": sum(s["rows"] for s in shards),
        "skipped_images": skipped,
    }
    write_json_atomic(out / MANIFEST, manifest)
    print(f"wrote {manifest['total_rows']} latents in {num_shards} shards to {out}; skipped {skipped} images")
    return manifest


class LatentDataset(Dataset):
    """Items (mean, std, label, image uint8) from an extracted folder; with flips, every stored image
    also appears mirrored (items N..2N-1), as a separate data point. Shards are read lazily."""

    def __init__(self, root: str | Path, use_flips: bool = True):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{self.root} has no {MANIFEST}: extraction did not finish (re-run it) or this is not a latent folder"
            )
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{manifest_path} is not valid JSON ({error}); re-run the extraction") from error
        self.shards, self.offsets = [], []
        total = 0
        for entry in self.manifest["shards"]:
            path = self.root / entry["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {manifest_path} but missing")
            with open_shard(path) as f:
                rows = f.get_slice("labels").get_shape()[0]
            if rows != entry["rows"]:
                raise UserError(f"{path} has {rows} rows but {manifest_path} says {entry['rows']}")
            self.shards.append(path)
            self.offsets.append(total)
            total += rows
        if total == 0:
            raise UserError(f"{self.root} holds no latents")
        self.rows = total
        self.flips = bool(self.manifest.get("flip")) and use_flips
        self.num_classes = self.manifest["num_classes"]
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self.rows * (2 if self.flips else 1)

    def _locate(self, row: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self.offsets, row) - 1
        return shard, row - self.offsets[shard]

    def __getitem__(self, index: int):
        flipped, row = divmod(index, self.rows)
        shard, local = self._locate(row)
        if shard not in self._handles:
            self._handles[shard] = open_shard(self.shards[shard])
        f = self._handles[shard]
        suffix = "_flipped" if flipped else ""
        mean = f.get_slice("mean" + suffix)[local : local + 1][0].float()
        std = f.get_slice("std" + suffix)[local : local + 1][0].float()
        image = f.get_slice("images")[local : local + 1][0]
        if flipped:
            image = image.flip(-1)
        label = f.get_slice("labels")[local : local + 1][0]
        return mean, std, label, image


def main(argv=None) -> None:
    from accelerate import Accelerator

    p = ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, type=Path, help="image folder (ImageNet layout, or --unconditional)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--resolution", type=positive_int, default=256)
    p.add_argument("--vae", default=autoencoder.SD_VAE_DEFAULT, help="AutoencoderKL hub id or folder")
    p.add_argument("--unconditional", action="store_true", help="one folder of images, label 0 (FFHQ)")
    p.add_argument("--flip", action="store_true", help="also store the latents of mirrored images")
    p.add_argument("--shard-size", type=positive_int, default=1024)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--num-workers", type=non_negative_int, default=4)
    p.add_argument("--on-error", choices=["skip", "abort"], default="skip", help="unreadable images")
    args = p.parse_args(argv)
    check_output_path(args.out, folder=True, what="--out")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    dataset = ImageFolderDataset(args.data, args.resolution, args.unconditional, args.on_error)
    vae = autoencoder.load_vae(args.vae, accelerator.device)
    extract_latents(accelerator, dataset, vae, args.out, args.shard_size, args.batch_size, args.flip, args.num_workers)


if __name__ == "__main__":
    run_cli(main)
