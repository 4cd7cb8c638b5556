"""Past one machine: a two-node Ray cluster started with `ray start` on 127.0.0.1 (a head and a worker node, one CPU
each, as on two plain machines), with the data stage on datatrove's RayPipelineExecutor and the pretraining stage
joining it through RAY_ADDRESS instead of starting a Ray of its own.

One CPU per node: two datatrove tasks at once, or two Ray Train workers of one CPU each, only fit on both nodes,
so a run that finishes has used the worker node. The data config is small but touches what must work inside Ray
workers: Trafilatura (one HTML page), the fastText language model and the LDNOOBW list (offline, from the assets
seeded under HF_HOME), source sampling, exact dedup (index, 1-task find, filter) and PII; its documents and counts
must equal the local executor's. Slow (fresh Ray actors per datatrove run, each importing spaCy): ~3 min.

Run: `.venv/bin/python -m pytest tests/e2e/test_ray_cluster.py -q`.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.env import DATA_DIR
from infra.env import REPO_ROOT as REPO
from tasks.data import DataConfig, build_corpus, crawl_inputs
from tasks.refs import CorpusRef
from tasks.tokenizer import TokenizerConfig, build_tokenizer

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.slow]
RAY = str(Path(sys.executable).with_name("ray"))
ADDRESS = "127.0.0.1:6391"

SMALL = dict(
    inputs=["data/crawl/CC-MAIN-2024-22_whirlwind.warc.gz", "data/crawl/CC-MAIN-2016-50_sparkwarc-sample.warc.wet.gz"],
    text_sources={"data/text/c4_demo.jsonl.gz": 0.2},
    minhash=False,  # 14 bucket tasks: the slowest run on Ray, and nothing Ray-specific that exact dedup lacks
    sentence_dedup=False,
    extract_timeout_s=10.0,  # the sandbox start on a busy machine must not turn into a counted timeout
)


def ray_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=180)


def alive_nodes() -> list[dict]:
    """The cluster's live nodes, read by a short-lived driver (this process keeps no Ray connection)."""
    code = (f"import json, ray; ray.init(address='{ADDRESS}', log_to_driver=False); "
            "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (`ray start --head`) and a worker node (`ray start --address`), one CPU each, both on 127.0.0.1."""
    temp = tmp_path_factory.mktemp("rayhead")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    try:
        head = ray_cli(["start", "--head", "--port=6391", "--include-dashboard=false", f"--temp-dir={temp}", *common],
                       env)
        assert head.returncode == 0, head.stdout + head.stderr
        worker = ray_cli(["start", f"--address={ADDRESS}", *common], env)
        assert worker.returncode == 0, worker.stdout + worker.stderr
        deadline = time.time() + 120
        while len(nodes := alive_nodes()) < 2:
            assert time.time() < deadline, f"the worker node never joined: {nodes}"
            time.sleep(2)
        assert [n.get("CPU") for n in nodes] == [1.0, 1.0], nodes
        yield ADDRESS, temp
    finally:
        ray_cli(["stop", "--force"], env)


def documents(out: Path) -> list[tuple]:
    rows = []
    for path in sorted((out / "documents").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            rows += [json.loads(line) for line in f]
    return sorted((r["id"], r["text"], json.dumps(r["metadata"], sort_keys=True)) for r in rows)


def step_counts(result: CorpusRef) -> dict:
    return {k: (c.get("in"), c.get("kept"), c.get("dropped_by_reason")) for k, c in result.counts["steps"].items()}


@pytest.fixture(scope="module")
def local_and_ray(cluster, tmp_path_factory):
    """The small data config on the local executor, then on the two-node cluster (joined through RAY_ADDRESS)."""
    import ray

    from infra.ray_cluster import ray_init

    address, _ = cluster
    folder = tmp_path_factory.mktemp("data_ray")
    local_cfg, ray_cfg = DataConfig(executor="local", **SMALL), DataConfig(executor="ray", **SMALL)
    local = build_corpus(local_cfg, crawl_inputs(local_cfg), folder / "local")  # before Ray: no forks after it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", address)
        ray_init()
        try:
            on_ray = build_corpus(ray_cfg, crawl_inputs(ray_cfg), folder / "ray")
        finally:
            ray.shutdown()
    return (folder / "local", local), (folder / "ray", on_ray)


def test_data_on_the_cluster_gives_the_local_documents_and_counts(local_and_ray):
    (local_dir, local), (ray_dir, on_ray) = local_and_ray
    assert step_counts(on_ray) == step_counts(local)
    assert documents(ray_dir) == documents(local_dir)
    assert on_ray.counts["mix"] == local.counts["mix"]
    steps = on_ray.counts["steps"]
    assert steps["filter/trafilatura"]["kept"] == 1  # the one HTML page was extracted inside a Ray worker
    assert steps["filter/language"]["kept"] > 40  # the fastText model loaded there, offline
    assert steps["exact_dedup/write"]["kept"] == on_ray.counts["totals"]["docs_out"] > 40


def test_data_runs_on_the_cluster_were_ray_runs(local_and_ray):
    (local_dir, _), (ray_dir, _) = local_and_ray
    for run in ("filter", "exact_signatures", "exact_find", "exact_dedup"):
        ray_executor = json.loads((ray_dir / "logs" / run / "executor.json").read_text())
        local_executor = json.loads((local_dir / "logs" / run / "executor.json").read_text())
        assert "cpus_per_task" in ray_executor and "cpus_per_task" not in local_executor, run
        assert sorted(p.name for p in (ray_dir / "logs" / run / "completions").iterdir()), run


def test_pretrain_joins_the_cluster_at_ray_address(cluster, tmp_path):
    """`gptflow pretrain` with RAY_ADDRESS set: two Ray Train workers of one CPU each, so one on each node."""
    address, head_temp = cluster
    corpus = CorpusRef(path=str(DATA_DIR / "text" / "c4_demo.jsonl.gz"))
    build_tokenizer(TokenizerConfig(vocab_size=512), corpus, tmp_path / "tok")
    home = tmp_path / "client"
    env = {**os.environ, "RAY_ADDRESS": address, "GPTFLOW_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "pretrain", "--input", str(tmp_path / "tok" / "shards"),
         "--set", "steps=4", "--set", "log_every=2", "--set", "eval_every=4", "--set", "ckpt_every=4",
         "--set", "model.block_size=32", "--set", "num_workers=2"],
        env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"steps": 4' in out.stdout
    assert not (home / "ray").exists(), "started a local Ray instead of joining the cluster"
    worker_logs = list(Path(head_temp).glob("session_2*/logs/worker-*"))
    assert any("[pretrain] step 4/4" in p.read_text(errors="ignore") for p in worker_logs), \
        "no training worker of this run logged on the cluster"
