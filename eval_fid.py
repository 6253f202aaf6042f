"""FID, sFID, Inception Score, precision and recall of generated images, as OpenAI's ADM evaluator defines them.

    python eval_fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz [--inception-weights PATH]

Inputs: an .npz with `arr_0` (N, H, W, 3) uint8, or a folder of PNG/JPEG images; the reference may be an
ADM reference batch (its mu/sigma/mu_s/sigma_s are used for FID/sFID, its images for precision/recall).
Reference features are cached next to the reference (or in --cache-dir) under the file's hash; when that
folder is read-only, in $XDG_CACHE_HOME/sit-atconv/fid (default ~/.cache/sit-atconv/fid).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sit_atconv.evaluation.evaluator import evaluate, save_results
from sit_atconv.io import check_output_path, positive_int, run_cli

NOT_PRINTED = ("samples", "reference")  # bookkeeping entries of the results; every other entry is printed
ERRORS = (ValueError, FileNotFoundError)  # the user's mistakes, reported in one line by run_cli


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", type=Path, help=".npz or folder of generated images")
    p.add_argument("--ref", required=True, type=Path, help="reference .npz (ADM batch) or folder")
    p.add_argument("--inception-weights", type=Path, help="torch-fidelity's TF-FID Inception weights file")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", type=Path, help="where to cache reference features (default: next to it)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--no-download", action="store_true", help="never download the Inception weights")
    p.add_argument("--out", type=Path, help="JSON results (default: <samples>.metrics.json)")
    args = p.parse_args(argv)
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
    )
    # Printed before saving, so a failed write (full disk) does not lose the numbers of a long run.
    print(json.dumps({key: value for key, value in results.items() if key not in NOT_PRINTED}, indent=2))
    save_results(results, out)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    run_cli(main, ERRORS)
