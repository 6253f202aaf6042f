"""Score generated digits with a classifier of the real ones.

    python -m sit_atconv.data.score_digits runs/demo-digits/samples.npz

The .npz is sample.py's (arr_0 uint8 images (N, H, W, 3), arr_1 the labels they were drawn for); the classifier,
trained on scikit-learn's digits, reads each image, and the share it reads as its label is printed.
"""

from pathlib import Path

from sit_atconv.cli import ArgumentParser, run_cli
from sit_atconv.data.digits import score_digit_samples
from sit_atconv.errors import UserError
from sit_atconv.evaluation.evaluator import load_images, read_npz


def main(argv=None) -> float:
    parser = ArgumentParser(prog="python -m sit_atconv.data.score_digits", description=__doc__)
    parser.add_argument("samples", type=Path, help="sample.py's .npz of digits, with labels (arr_1)")
    args = parser.parse_args(argv)
    images = load_images(args.samples)
    labels = read_npz(args.samples, ["arr_1"]).get("arr_1")
    if labels is None or labels.shape != (len(images),):
        raise UserError(f"{args.samples} has no labels for its {len(images)} images (arr_1); sample with sample.py")
    accuracy = score_digit_samples(images, labels)
    print(f"digit classifier agrees with the requested class on {100 * accuracy:.1f}% of {args.samples}")
    return accuracy


if __name__ == "__main__":
    run_cli(main)
