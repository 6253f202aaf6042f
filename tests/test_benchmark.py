"""The benchmark's measuring code runs and reports every variant (timings themselves are not asserted)."""

import math

from benchmarks.bench_atconv import OP_VARIANTS, ratio, run_group, run_memory, timing


def test_operator_group_reports_every_variant():
    spec = dict(
        kind="op",
        device="cpu",
        dtype="fp32",
        threads=0,
        compile=False,
        batch=2,
        channels=8,
        heads=2,
        size=4,
        repeats=2,
        variants=OP_VARIANTS,
    )
    result = run_group(spec)
    assert set(result) == set(OP_VARIANTS)
    for variant in OP_VARIANTS:
        assert len(result[variant]["ms_all"]) == 2
        assert 0 < result[variant]["ms_min"] <= result[variant]["ms"]
    assert math.isfinite(run_memory(dict(spec, variants=["atconv"]))["peak_mib"])
    assert timing({"ms": 2.0, "ms_min": 1.5}) == "2.00 (1.50)"
    assert ratio({"ms": 3.0, "ms_min": 2.0}, {"ms": 1.5, "ms_min": 1.0}) == "2.00x (2.00x)"
