"""FID, sFID, Inception Score, precision and recall of generated images, as OpenAI's ADM evaluator defines them,
and FD_DINOv2 (the Frechet distance of DINOv2 ViT-L/14 CLS features, as dgm-eval and EDM2 compute it).

    python eval_fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz [--inception-weights PATH]
    python eval_fid.py samples.npz --ref ref.npz --metrics fid,fd_dinov2 [--dinov2-weights model.safetensors]

--metrics (comma-separated): fid, sfid, is, pr (precision and recall), fd_dinov2; default fid,sfid,is,pr.
Only the requested metrics are computed: fd_dinov2 alone builds no Inception. fd_dinov2 needs the weights of the
--dinov2 encoder (default dinov2-vit-l, the ViT-L/14 of dgm-eval and EDM2; others are not comparable to their
numbers): timm downloads them, or pass the file (timm/vit_large_patch14_dinov2.lvd142m on the Hugging Face hub)
with --dinov2-weights on an offline machine.

Inputs: an .npz with `arr_0` (N, H, W, 3) uint8, or a folder of PNG/JPEG images; the reference may be an
ADM reference batch (its mu/sigma/mu_s/sigma_s are used for FID/sFID, its images for precision/recall).
Reference features are cached next to the reference (or in --cache-dir) under the file's hash; when that
folder is read-only, in $XDG_CACHE_HOME/sit-atconv/fid (default ~/.cache/sit-atconv/fid).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from sit_atconv.cli import ArgumentParser, positive_int, run_cli
from sit_atconv.evaluation.dinov2 import DEFAULT_DINOV2
from sit_atconv.evaluation.evaluator import DEFAULT_METRICS, METRICS, evaluate, metric_list, save_results
from sit_atconv.io import check_output_path
from sit_atconv.repa import ENCODERS

# bookkeeping entries of the results (in the JSON file; skipped metrics are warned about); the rest is printed
NOT_PRINTED = ("samples", "reference", "skipped", "provenance")


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__)
    p.add_argument("samples", type=Path, help=".npz or folder of generated images")
    p.add_argument("--ref", required=True, type=Path, help="reference .npz (ADM batch) or folder")
    p.add_argument("--inception-weights", type=Path, help="torch-fidelity's TF-FID Inception weights file")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", type=Path, help="where to cache reference features (default: next to it)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-download", action="store_true", help="never download the Inception weights")
    p.add_argument(
        "--metrics",
        type=metric_list,
        default=DEFAULT_METRICS,
        help=f"comma-separated, of {','.join(METRICS)} (default: {','.join(DEFAULT_METRICS)})",
    )
    p.add_argument(
        "--dinov2",
        choices=list(ENCODERS),
        default=DEFAULT_DINOV2,
        help=f"encoder of fd_dinov2 (default: {DEFAULT_DINOV2}, ViT-L/14 as dgm-eval and EDM2)",
    )
    p.add_argument("--dinov2-weights", type=Path, help="local weights file of the --dinov2 encoder (offline)")
    p.add_argument("--out", type=Path, help="JSON results (default: <samples>.metrics.json)")
    args = p.parse_args(argv)
    if "fd_dinov2" not in args.metrics and (args.dinov2_weights is not None or args.dinov2 != DEFAULT_DINOV2):
        warnings.warn("--dinov2/--dinov2-weights are given but --metrics does not ask for fd_dinov2", stacklevel=1)
    out = check_output_path(args.out or args.samples.with_name(args.samples.name + ".metrics.json"), what="--out")
    if args.cache_dir is not None and not args.no_cache:
        check_output_path(args.cache_dir, folder=True, what="--cache-dir")
    results = evaluate(
        args.samples,
        args.ref,
        inception_weights=args.inception_weights,
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        download=not args.no_download,
        metrics=args.metrics,
        dinov2=args.dinov2,
        dinov2_weights=args.dinov2_weights,
    )
    # Printed before saving, so a failed write (full disk) does not lose the numbers of a long run.
    print(json.dumps({key: value for key, value in results.items() if key not in NOT_PRINTED}, indent=2))
    save_results(results, out)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    run_cli(main)
