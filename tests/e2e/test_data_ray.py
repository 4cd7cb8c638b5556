"""The data stage on datatrove's RayPipelineExecutor gives the same documents and counts as on the local executor.

A local Ray (2 CPUs) started by the test stands in for the cluster at RAY_ADDRESS. The config is small but touches
what must work inside Ray workers: Trafilatura (one HTML page), the fastText language model and the LDNOOBW list
(offline, from the assets seeded under HF_HOME), source sampling, exact dedup (index, 1-task find, filter) and PII.
Slow (each datatrove run starts fresh Ray actors, each of which imports spaCy): about 1-2 minutes on 2 busy cores.

Run: `.venv/bin/python -m pytest tests/e2e/test_data_ray.py -q`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tasks.data import DataConfig, build_corpus, crawl_inputs
from tasks.refs import CorpusRef

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.slow]

SMALL = dict(
    inputs=["data/crawl/CC-MAIN-2024-22_whirlwind.warc.gz", "data/crawl/CC-MAIN-2016-50_sparkwarc-sample.warc.wet.gz"],
    text_sources={"data/text/c4_demo.jsonl.gz": 0.2},
    minhash=False,  # 14 bucket tasks: the slowest run on Ray, and nothing Ray-specific that exact dedup lacks
    sentence_dedup=False,
    extract_timeout_s=10.0,  # the sandbox start on a busy machine must not turn into a counted timeout
)


def documents(out: Path) -> list[tuple]:
    rows = []
    for path in sorted((out / "documents").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            rows += [json.loads(line) for line in f]
    return sorted((r["id"], r["text"], json.dumps(r["metadata"], sort_keys=True)) for r in rows)


def step_counts(result: CorpusRef) -> dict:
    return {k: (c.get("in"), c.get("kept"), c.get("dropped_by_reason")) for k, c in result.counts["steps"].items()}


@pytest.fixture(scope="module")
def local_and_ray(tmp_path_factory):
    import ray

    from infra.ray_cluster import ray_init

    folder = tmp_path_factory.mktemp("data_ray")
    local_cfg, ray_cfg = DataConfig(executor="local", **SMALL), DataConfig(executor="ray", **SMALL)
    local = build_corpus(local_cfg, crawl_inputs(local_cfg), folder / "local")  # before Ray: no forks after it
    ray_init(num_cpus=2)
    try:
        on_ray = build_corpus(ray_cfg, crawl_inputs(ray_cfg), folder / "ray")
    finally:
        ray.shutdown()
    return (folder / "local", local), (folder / "ray", on_ray)


def test_ray_executor_gives_the_local_documents_and_counts(local_and_ray):
    (local_dir, local), (ray_dir, on_ray) = local_and_ray
    assert step_counts(on_ray) == step_counts(local)
    assert documents(ray_dir) == documents(local_dir)
    assert on_ray.counts["mix"] == local.counts["mix"]
    steps = on_ray.counts["steps"]
    assert steps["filter/trafilatura"]["kept"] == 1  # the one HTML page was extracted inside a Ray worker
    assert steps["filter/language"]["kept"] > 40  # the fastText model loaded there, offline
    assert steps["exact_dedup/write"]["kept"] == on_ray.counts["totals"]["docs_out"] > 40


def test_ray_runs_were_ray_runs(local_and_ray):
    (local_dir, _), (ray_dir, _) = local_and_ray
    for run in ("filter", "exact_signatures", "exact_find", "exact_dedup"):
        ray_executor = json.loads((ray_dir / "logs" / run / "executor.json").read_text())
        local_executor = json.loads((local_dir / "logs" / run / "executor.json").read_text())
        assert "cpus_per_task" in ray_executor and "cpus_per_task" not in local_executor, run
        assert sorted(p.name for p in (ray_dir / "logs" / run / "completions").iterdir()), run
