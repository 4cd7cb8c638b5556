"""The fit that `bench.data` draws over input sizes: start-up plus documents over throughput.

Run: `.venv/bin/python -m pytest tests/unit/test_bench_scaling.py -q` (well under a second).
"""

import pytest

from bench.data import line_fit, scaling


def test_line_fit_recovers_a_line_and_least_squares_through_noise():
    assert line_fit([1, 2, 4], [3, 5, 9]) == pytest.approx((1.0, 2.0))
    intercept, slope = line_fit([0, 1, 2, 3], [1, 2, 2, 3])  # hand-computed least squares: 1.1 + 0.6 x
    assert (intercept, slope) == pytest.approx((1.1, 0.6))
    with pytest.raises(ValueError):
        line_fit([5, 5], [1, 2])


def test_scaling_splits_a_fixed_start_up_from_a_per_document_overhead():
    docs = [400, 3200]
    # bare: 1 s start-up + 0.01 s/doc; ours: 8 s start-up + 0.0105 s/doc (5 % more per document)
    seconds = {"bare": [1 + 0.01 * d for d in docs], "ours": [8 + 0.0105 * d for d in docs]}
    fit = scaling(docs, seconds, workers=2)
    assert fit["bare"]["start_up_s"] == pytest.approx(1.0)
    assert fit["bare"]["docs_per_s_per_core"] == pytest.approx(50.0)  # 100 docs/s over 2 workers
    assert "overhead_per_doc" not in fit["bare"]
    assert fit["ours"]["added_start_up_s"] == pytest.approx(7.0)
    assert fit["ours"]["overhead_per_doc"] == pytest.approx(0.05)
    # at 400 docs ours takes 12.2 s against 5 s, +144 % overall: the fixed part, not the per-document one
    assert seconds["ours"][0] / seconds["bare"][0] - 1 == pytest.approx(1.44)
    for v in ("bare", "ours"):  # the fit gives back the timings it was drawn from
        rate = fit[v]["docs_per_s_per_core"] * 2
        start = fit[v]["start_up_s"] if v == "bare" else fit["bare"]["start_up_s"] + fit[v]["added_start_up_s"]
        assert [start + d / rate for d in docs] == pytest.approx(seconds[v])
