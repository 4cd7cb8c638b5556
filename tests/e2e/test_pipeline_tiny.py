"""The one whole-pipeline run: tiny preset, bundled sample crawl, real Prefect (ephemeral), MLflow (sqlite),
Ray (local), datatrove and lm-eval (`first_run`: tests/e2e/conftest.py), with a second `gptflow run --preset tiny`
started 3 s after it on the same workspace (`two_runs`): at each stage either one computes and the other waits and
reuses, so the curves of a stage are read from the run that computed it. Then a rerun, which must reuse every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.pipeline import llm_pipeline_flow
from tasks.tracking import EXPERIMENT

STAGES = ["data", "tokenizer", "pretrain", "sft", "dpo", "reward", "ppo", "decontam", "eval-base", "eval-sft", "eval-dpo",
          "eval-ppo"]  # run names
CACHED = ["data", "tokenizer", "pretrain", "sft", "dpo", "reward", "ppo", "decontam", "eval_base", "eval_sft", "eval_dpo",
          "eval_ppo"]  # refs
pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.slow]


def _children(client: MlflowClient, parent_id: str, depth: int = 2) -> dict:
    """The runs nested under `parent_id`, and under those (a model's eval nests under its stage's run)."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    found = {r.info.run_name: r for r in runs}
    for r in runs if depth > 1 else []:
        found |= _children(client, r.info.run_id, depth - 1)
    return found


def both(two_runs) -> tuple[dict, dict]:
    assert two_runs.second_rc == 0 and two_runs.second is not None, two_runs.second_log[-4000:]
    return two_runs.first, two_runs.second


def curves_of(run) -> str:
    """The id of the run with a stage's per-step curves: its own, or for a reused stage folder the run that
    computed it (tag `computed_in_run`)."""
    if run.data.tags["cached"] == "false":
        return run.info.run_id
    assert run.data.tags.get("computed_in_run"), f"{run.info.run_name}: reused, without the run that computed it"
    return run.data.tags["computed_in_run"]


def test_every_stage_has_a_nested_run_with_metrics_and_artifacts(two_runs, workspace):
    client, first_run = MlflowClient(), two_runs.first
    artifacts = client.get_experiment_by_name(EXPERIMENT).artifact_location
    assert artifacts == (Path(workspace) / "mlartifacts").resolve().as_uri()  # not ./mlruns of the current folder
    parent = client.get_run(first_run["run_id"])
    assert parent.info.status == "FINISHED"
    for stage in ["data", "tokenizer", "pretrain", "sft", "dpo", "reward", "ppo", "eval_base", "eval_sft", "eval_dpo",
                  "eval_ppo", "register_dpo", "register_ppo", "promote", "total"]:
        assert parent.data.metrics[f"time/{stage}_s"] > 0
    children = _children(client, first_run["run_id"])
    assert set(STAGES + ["register-dpo", "register-ppo", "promote"]) <= set(children), sorted(children)
    for model, stage in (("base", "pretrain"), ("sft", "sft"), ("dpo", "dpo"), ("ppo", "ppo")):  # eval under its model
        assert children[f"eval-{model}"].data.tags["mlflow.parentRunId"] == children[stage].info.run_id
    ppo_run = curves_of(children["ppo"])  # the per-step curves are on the run that trained (either of the two)
    ppo = client.get_run(ppo_run).data.metrics  # PPO's curves and the reward model it trained against
    assert {"ppo/reward", "ppo/kl", "ppo/clip_frac", "ppo/entropy", "ppo/value_loss", "ppo/explained_variance",
            "perf/rollout_tokens_per_s"} <= set(ppo), sorted(ppo)
    assert len(client.get_metric_history(ppo_run, "ppo/reward")) >= 2  # a curve, not a point
    assert {"dpo/margin", "dpo/reward_acc"} <= set(client.get_run(curves_of(children["dpo"])).data.metrics)
    table = Path(client.download_artifacts(first_run["run_id"], "results.md")).read_text()
    assert table.splitlines()[0].split("|")[2:6] == [" base ", " sft ", " dpo ", " ppo "], table  # side by side
    assert first_run["eval_table"] == table
    assert {"results.png", "contamination.md"} <= {a.path for a in client.list_artifacts(first_run["run_id"])}
    report = Path(client.download_artifacts(first_run["run_id"], "contamination.md")).read_text()
    assert "| hellaswag |" in report and "acc (clean)" in report, report
    assert {"decontam/hellaswag/fraction", "decontam/arc_easy/fraction"} <= set(children["decontam"].data.metrics)
    assert "clean/arc_easy/acc" in children["eval-sft"].data.metrics
    for stage in STAGES:
        run = children[stage]
        assert run.info.status == "FINISHED", stage
        assert run.data.params, f"{stage} logged no params"
        assert run.data.metrics["time/seconds"] > 0
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "manifest.json" in names, (stage, names)
        manifest = json.loads(Path(client.download_artifacts(run.info.run_id, "manifest.json")).read_text())
        assert manifest["stage"] == stage.split("-")[0] and manifest["outputs"], stage
        for out in manifest["outputs"].values():
            assert len(out["sha256"]) == 64
    data_files = {a.path for a in client.list_artifacts(children["data"].info.run_id)}
    assert {"funnel.png", "samples"} <= data_files, data_files
    assert children["data"].data.metrics["data/totals.docs_out"] > 50
    for stage, dataset in (("tokenizer", "corpus"), ("pretrain", "token-shards")):
        inputs = client.get_run(children[stage].info.run_id).inputs.dataset_inputs
        assert [d.dataset.name for d in inputs] == [dataset], stage
    pretrain_run = client.get_run(curves_of(children["pretrain"]))
    pre = pretrain_run.data.metrics
    assert {"train/loss", "val/loss", "val/bpb", "perf/tokens_per_s", "perf/mfu"} <= set(pre)
    history = client.get_metric_history(pretrain_run.info.run_id, "train/loss")
    assert len(history) >= 2 and history[-1].value < history[0].value, "pretraining loss did not fall"
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(children["pretrain"].info.run_id)}
    sft = client.get_run(curves_of(children["sft"])).data.metrics
    assert sft["sft/val_loss_after"] < sft["sft/val_loss_before"]
    assert children["eval-dpo"].data.tags["branch"] == "dpo"
    evals = children["eval-dpo"].data.metrics
    for task in ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "openbookqa",
                 "lambada_openai", "wikitext"]:
        assert any(k.startswith(f"eval/{task}/") or k.startswith(f"eval/gptflow_{task}/") for k in evals), task


def test_each_branch_is_a_version_and_the_first_candidate_becomes_champion(two_runs):
    client = MlflowClient()
    first_run, second = both(two_runs)
    m, decision = first_run["model"], first_run["decision"]
    version = client.get_model_version_by_alias(m["name"], "candidate")
    assert int(version.version) == m["version"]
    assert version.tags["preset"] == "tiny"
    # registered by whichever run got there first; the other found the same weights
    assert version.tags["pipeline_run_id"] in (first_run["run_id"], second["run_id"])
    assert version.tags["align_method"] == decision["method"] in ("dpo", "ppo")
    outcomes = sorted(r["decision"]["outcome"] for r in (first_run, second))
    assert outcomes == ["already-champion", "first"] and version.tags["gate.outcome"] == "first", outcomes
    assert client.get_model_version_by_alias(m["name"], "champion").version == version.version
    for method, reg in first_run["models"].items():
        assert int(client.get_model_version_by_alias(m["name"], method).version) == reg["version"]
        assert float(client.get_model_version(m["name"], str(reg["version"])).tags["score.mean/acc"]) > 0
    assert "Gate: first" in version.description and "Contamination" in version.description
    assert 0.0 <= float(version.tags["contamination.hellaswag"]) <= 1.0


def test_the_registered_model_loads_and_generates(first_run):
    import mlflow.pyfunc

    m = first_run["model"]
    model = mlflow.pyfunc.load_model(f"models:/{m['name']}@candidate")
    out = model.predict(["What is the capital of France?"], params={"max_new_tokens": 8})
    assert len(out) == 1 and isinstance(out[0], str)


def test_the_champion_loads_with_transformers_and_carries_its_card_and_tags(first_run, tmp_path):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = first_run["model"]
    version = MlflowClient().get_model_version_by_alias(m["name"], "champion")
    mlflow.artifacts.download_artifacts(f"models:/{m['name']}/{version.version}", dst_path=str(tmp_path))
    hf = tmp_path / "artifacts" / "hf"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(hf), AutoTokenizer.from_pretrained(hf)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4 or out[0, -1] == tokenizer.eos_token_id
    card = (hf / "README.md").read_text()
    for section in ("## Data", "## Size", "## Compute", "## Scores", "## Contamination", "## Intended use"):
        assert section in card and section in version.description, section
    assert "CC-MAIN-2020-34_resiliparse-warcfile.warc.gz" in card and "FLOPs" in card
    tags = version.tags
    assert len(tags["git_sha"]) == 40 and len(tags["data_manifest_sha256"]) == 64
    assert tags["tokenizer_sha256"] and json.loads(tags["config_json"])["preset"] == "tiny"


def test_lineage_from_the_champion_to_the_crawl_files(first_run):
    """Version -> its run (register-<branch>) -> the pipeline run -> the data stage's run -> its dataset inputs:
    the crawl files by name and content digest; the corpus digest the data run made is the tokenizer's input."""
    from infra.env import resolve_path
    from tasks.data.config import BUNDLED_CRAWL
    from tasks.stage import path_sha256

    client = MlflowClient()
    m = first_run["model"]
    version = client.get_model_version_by_alias(m["name"], "champion")
    source = client.get_run(version.run_id)
    assert source.info.run_name == f"register-{first_run['decision']['method']}"
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == source.info.run_id and {x.dataset_name for x in logged.metrics} == {"benchmarks"}
    children = _children(client, source.data.tags["mlflow.parentRunId"])
    data_inputs = {d.dataset.name: d for d in children["data"].inputs.dataset_inputs}
    crawl = [Path(resolve_path(p)).resolve() for p in BUNDLED_CRAWL]  # the tiny preset's crawl files
    assert all(f.name in data_inputs for f in crawl), sorted(data_inputs)
    for f in crawl:
        ds = data_inputs[f.name].dataset
        assert ds.digest == path_sha256(f)[:20] and f.as_uri() in ds.source, (f, ds)
    corpus = children["tokenizer"].inputs.dataset_inputs[0].dataset
    assert corpus.digest == children["data"].data.tags["output_sha256"][:20]
    sft_inputs = {d.dataset.name for d in children["sft"].inputs.dataset_inputs}
    assert "alpaca_en_demo.json.gz" in sft_inputs, sft_inputs
    assert "benchmarks" in {d.dataset.name for d in children["eval-sft"].inputs.dataset_inputs}
    # the registering run lists the whole lineage of its model itself, each dataset tagged with its stage
    stages = {t.value for d in source.inputs.dataset_inputs for t in d.tags if t.key == "gptflow.stage"}
    assert {"data", "tokenizer", "pretrain", "sft", "eval"} <= stages, stages
    assert {f.name for f in crawl} <= {d.dataset.name for d in source.inputs.dataset_inputs}


def test_mlflow_models_serve_answers_a_chat_request(first_run, tmp_path):
    """`mlflow models serve` on the champion, on 127.0.0.1: the same greedy answer as the pyfunc in-process.
    Costs ~15 s on a free machine (the server's start), ~70 s on a busy 2-core one."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import mlflow.pyfunc

    m = first_run["model"]
    uri = f"models:/{m['name']}/{m['version']}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    log = (tmp_path / "serve.log").open("w")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # its uvicorn
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        body = json.dumps({"inputs": {"messages": messages}, "params": {"max_new_tokens": 16}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())["predictions"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    local = mlflow.pyfunc.load_model(uri).predict({"messages": messages}, params={"max_new_tokens": 16})
    assert isinstance(reply, str) and reply == local, (reply, local)


def test_a_second_run_started_3_s_later_on_the_same_workspace_completes_beside_the_first(two_runs):
    """Issue 19: two `gptflow run --preset tiny` at once on one workspace (the first here in-process). Both complete,
    no stage's core runs twice, each run keeps its own MLflow runs, and no new model version comes of the second."""
    client = MlflowClient()
    first, second = both(two_runs)
    assert second["run_id"] != first["run_id"]
    assert second["stage_dirs"] == first["stage_dirs"]  # one folder per stage key, shared, written once
    assert [s for s in CACHED if not first["cached"][s] and not second["cached"][s]] == [], (first["cached"],
                                                                                             second["cached"])
    if not first["cached"]["data"]:  # the data stage takes ~20 s: the second run waited on its lock
        assert "data: waiting for pid" in two_runs.second_log
    children = _children(client, second["run_id"])  # its own stage runs, each tagged as it went
    first_children = _children(client, first["run_id"])
    for stage, name in zip(CACHED, STAGES, strict=True):
        assert children[name].data.tags["cached"] == str(second["cached"][stage]).lower(), name
        if second["cached"][stage] and not first["cached"][stage]:  # reused: linked to the run that computed it
            assert children[name].data.tags["computed_in_run"] == first_children[name].info.run_id, name
    assert {k: v["version"] for k, v in second["models"].items()} == {k: v["version"] for k, v in first["models"].items()}
    name = first["model"]["name"]
    versions = {int(v.version) for v in client.search_model_versions(f"name = '{name}'")}
    assert versions == {v["version"] for v in first["models"].values()}, versions
    assert int(client.get_model_version_by_alias(name, "champion").version) == first["model"]["version"] \
        == second["model"]["version"]


def test_every_ray_train_stage_splits_its_fit_into_start_up_loop_and_end(two_runs):
    """Each fit is made by one of the two runs (the other reuses the stage) and split in the run that made it."""
    runs = both(two_runs)
    assert not set(runs[0]["fit_clocks"]) & set(runs[1]["fit_clocks"])
    assert set(runs[0]["fit_clocks"]) | set(runs[1]["fit_clocks"]) == {"pretrain", "sft", "dpo", "reward", "ppo"}
    for run in runs:
        for stage, c in run["fit_clocks"].items():
            assert c["fit_startup_seconds"] > 0 and c["fit_end_seconds"] >= 0, (stage, c)
            assert c["fit_startup_seconds"] + c["fit_end_seconds"] < c["fit_seconds"], (stage, c)
            assert c["fit_seconds"] < run["core_seconds"][stage] < run["times"][stage]  # fit < stage core < task


def test_rerun_with_unchanged_inputs_reuses_every_stage(first_run):
    again = llm_pipeline_flow(preset="tiny")
    assert all(again["cached"][s] for s in CACHED), again["cached"]
    assert again["stage_dirs"] == first_run["stage_dirs"]
    assert again["models"] == {k: {**v, "reused": True} for k, v in first_run["models"].items()}  # no new version
    assert again["decision"]["outcome"] == "already-champion"
    assert again["fit_clocks"] == {}  # no stage made a fit
    # a new DPO model alone, every model scored on fewer documents: the champion (the first run's best branch) is
    # scored again under the new setup before the gate compares
    changed = llm_pipeline_flow(preset="tiny", overrides={"align.methods": ["dpo"], "align.dpo.steps": 2,
                                                          "eval.limit": 10})
    cached = changed["cached"]
    assert cached["data"] and cached["tokenizer"] and cached["pretrain"] and cached["sft"] and "ppo" not in cached
    assert not cached["dpo"] and not cached["eval_sft"] and not cached["eval_dpo"]
    decision = changed["decision"]
    assert "eval_champion" in changed["times"] and decision["outcome"] in ("promoted", "kept"), decision
    champion = MlflowClient().get_model_version_by_alias(first_run["model"]["name"], "champion")
    expected = changed["model"]["version"] if decision["promote"] else first_run["model"]["version"]
    assert int(champion.version) == expected


def test_the_run_report_holds_the_runs_numbers_in_mlflow_and_prefect(first_run):
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.report import EVAL_KEY, REPORT_KEY
    from tasks.report_render import fmt

    client = MlflowClient()
    run_id = first_run["run_id"]
    on_run = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.md", "report.html", "environment.json", "report_images"} <= on_run, on_run
    md = Path(client.download_artifacts(run_id, "report.md")).read_text()
    html = Path(first_run["report"]).read_text()
    # the funnel and the tokenizer as the stages' own manifests on disk say
    data = json.loads((Path(first_run["stage_dirs"]["data"]) / "manifest.json").read_text())["counts"]
    assert f"{data['totals']['docs_out']:,} documents out" in md
    for step, s in data["steps"].items():
        if "kept" in s:
            assert f"| {step} | {s['in']:,} | {s['kept']:,} |" in md, step
    tok = json.loads((Path(first_run["stage_dirs"]["tokenizer"]) / "manifest.json").read_text())["counts"]
    assert f"| train_tokens | {tok['train_tokens']:,} |" in md and f"| vocab_size | {tok['vocab_size']:,} |" in md
    pre = json.loads((Path(first_run["stage_dirs"]["pretrain"]) / "manifest.json").read_text())["counts"]
    assert f"| tokens | {pre['tokens']:,} |" in md and "| mfu |" in md and "| train_flops |" in md
    # the eval table exactly as results.md; timings with the total; this machine's versions
    assert first_run["eval_table"].strip() in md
    total = client.get_run(run_id).data.metrics["time/total_s"]
    assert f"| total | {fmt(round(total, 1))} |" in md
    import torch

    assert f"| torch | {torch.__version__} |" in md and "| cores |" in md
    for section in ("Data funnel", "Tokenizer", "Model size and compute", "Loss curves", "Post-training curves",
                    "Evaluation", "Stage timings and cache hits", "Environment"):
        assert f"## {section}" in md, section
    # self-contained: every image inlined, no external src or href
    assert html.count('src="data:image/png;base64,') >= 3
    assert not re.findall(r'(?:src|href)="(?!data:|#)', html), re.findall(r'(?:src|href)="[^"]*', html)[:3]
    # the Prefect artifacts of this flow run: the report and the eval table (rows = results.md's rows)
    flow_run = client.get_run(run_id).data.tags["prefect_flow_run_id"]
    with get_client(sync_client=True) as prefect:
        found = {a.key: a for a in prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run])))}
    assert {REPORT_KEY, EVAL_KEY} <= set(found), set(found)
    assert found[REPORT_KEY].type == "markdown" and "## Data funnel" in found[REPORT_KEY].data
    rows = json.loads(found[EVAL_KEY].data) if isinstance(found[EVAL_KEY].data, str) else found[EVAL_KEY].data
    benchmarks = [ln.split("|")[1].strip() for ln in first_run["eval_table"].splitlines()[2:] if ln.startswith("|")]
    assert [r["benchmark"] for r in rows] == benchmarks


def test_nothing_was_written_into_the_home_folder(first_run):
    import os

    home = Path(os.environ["GPTFLOW_TEST_HOME"])
    assert Path.home() == home
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []
