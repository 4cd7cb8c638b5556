"""bench.eval at a tiny size, so it cannot rot: both classes score the same HellaSwag requests, to the same
log-likelihoods, and the rates come out. Run: `python -m pytest tests/unit/test_bench_eval.py -q` (~20 s)."""

from __future__ import annotations

import json

from bench.eval import main


def test_bench_eval_runs_both_classes_on_the_same_requests(tmp_path):
    out = tmp_path / "eval.json"
    r = main(["--docs", "2", "--batch", "4", "--layers", "1", "--embd", "32", "--block", "128", "--threads", "1",
              "--out", str(out)])
    assert r["requests"] == 8  # 2 documents x 4 endings
    assert r["max_abs_loglikelihood_diff"] < 1e-4  # the same answers from both paths
    assert r["gptflow_requests_per_s"] > 0 and r["hf_requests_per_s"] > 0
    assert r["gptflow_over_hf"] == r["gptflow_requests_per_s"] / r["hf_requests_per_s"]
    assert json.loads(out.read_text())["requests"] == 8
