"""Deprecated alias of `sit_atconv.generation` (renamed in 0.2.0; this module goes away in 0.3.0).

Generation lives in `sit_atconv.generation`, the sharded .npz writer in `sit_atconv.sharded_npz` and
the autoencoder in `sit_atconv.vae`; the old names below keep working meanwhile.
"""

import warnings

from sit_atconv.generation import (  # noqa: F401
    GenerationConfig,
    check_generation,
    class_labels,
    generate,
    sample_to_npz,
    save_labelled_grid,
)
from sit_atconv.sharded_npz import run_fingerprint, shard_ranges, versions  # noqa: F401
from sit_atconv.vae import decode as decode_latents  # noqa: F401
from sit_atconv.vae import load_vae  # noqa: F401
from sit_atconv.vae import vae_for_model as vae_for  # noqa: F401

warnings.warn(
    "sit_atconv.sampling is deprecated: use sit_atconv.generation (and sit_atconv.vae for the autoencoder)",
    DeprecationWarning,
    stacklevel=2,
)
