"""The real digits as a reference batch, for `eval_fid.py --metrics fd_digits,digit_accuracy` and the sweep.

    python -m sit_atconv.data.digits_reference runs/digits16.npz --resolution 16

writes all 1,797 of scikit-learn's digits, upsampled as `DigitsDataset` does, in ADM's layout: arr_0 uint8
(N, H, W, 3), arr_1 their labels.
"""

from pathlib import Path

from sit_atconv.cli import ArgumentParser, positive_int, run_cli
from sit_atconv.data.digits import DigitsDataset
from sit_atconv.data.images import to_uint8_nhwc
from sit_atconv.io import check_output_path, write_npz_atomic


def main(argv=None) -> Path:
    parser = ArgumentParser(prog="python -m sit_atconv.data.digits_reference", description=__doc__)
    parser.add_argument("out", type=Path, help="the .npz to write")
    parser.add_argument("--resolution", type=positive_int, default=16, help="side of the images (the model's)")
    args = parser.parse_args(argv)
    if args.out.suffix != ".npz":
        parser.error(f"{args.out}: expected an .npz file name")
    check_output_path(args.out)
    dataset = DigitsDataset(args.resolution)
    write_npz_atomic(args.out, arr_0=to_uint8_nhwc(dataset.images).numpy(), arr_1=dataset.labels.numpy())
    print(f"wrote {args.out}: {len(dataset)} real digits at {args.resolution}x{args.resolution}")
    return args.out


if __name__ == "__main__":
    run_cli(main)
