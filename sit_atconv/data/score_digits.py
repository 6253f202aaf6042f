"""Score generated digits with a classifier of the real ones: python -m sit_atconv.data.score_digits S.npz"""

import sys

import numpy as np

from sit_atconv.data.digits import score_digit_samples


def main(argv=None) -> float:
    path = (argv or sys.argv[1:])[0]
    with np.load(path) as data:
        accuracy = score_digit_samples(data["arr_0"], data["arr_1"])
    print(f"digit classifier agrees with the requested class on {100 * accuracy:.1f}% of {path}")
    return accuracy


if __name__ == "__main__":
    main()
