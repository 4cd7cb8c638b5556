"""Each thin Prefect task, called as `<task>.fn` (no Prefect engine) against a throwaway sqlite MLflow: it runs its
core through `run_stage`, returns the stage's ref, and logs params, counts, metrics, artifacts and lineage.

Run: `.venv/bin/python -m pytest tests/unit/test_stages.py` (the pretrain task starts a local Ray: marker `ray`).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.stages import (
    data_task,
    decontam_task,
    dpo_task,
    eval_task,
    pretrain_task,
    register_task,
    sft_task,
    tokenizer_task,
)
from infra.env import DATA_DIR, resolve_path
from models.checkpoint import load_model, save_model
from models.config import GPTConfig
from models.gpt import GPT
from tasks.conversations import PreferenceSource, SFTSource
from tasks.data import DataConfig
from tasks.decontam import DecontamConfig
from tasks.dpo import DPOConfig
from tasks.evaluate import EvalConfig
from tasks.pretrain import PretrainConfig
from tasks.refs import ContaminationReport, CorpusRef, EvalReport, ModelRef, ShardsRef, TokenizerRef
from tasks.registry import RegistryConfig
from tasks.sft import SFTConfig
from tasks.stage import path_sha256
from tasks.tokenizer import TokenizerConfig
from tasks.tracking import EXPERIMENT

pytestmark = pytest.mark.usefixtures("one_thread", "sqlite_mlflow")  # a fresh MLflow store for the module

VOCAB = 320


def stage_run(stage: str):
    """The latest MLflow run of a stage."""
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    (run,) = MlflowClient().search_runs([exp.experiment_id], f"tags.stage = '{stage}'", order_by=["start_time DESC"],
                                        max_results=1)
    return run


def artifacts(run) -> set[str]:
    return {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def tokenizer(root) -> TokenizerRef:
    corpus = CorpusRef(path=str(DATA_DIR / "text" / "c4_demo.jsonl.gz"))
    return tokenizer_task.fn(TokenizerConfig(vocab_size=VOCAB, shard_tokens=20_000), corpus, root)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> ModelRef:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base") / "model"
    save_model(GPT(GPTConfig(vocab_size=VOCAB, block_size=64, n_layer=1, n_head=2, n_embd=32)), folder)
    return ModelRef(path=str(folder))


@pytest.mark.slow
@pytest.mark.forks  # datatrove's local executor: before the session's Ray (tests/conftest.py)
def test_data_task(root):
    wet = "data/crawl/CC-MAIN-2016-50_sparkwarc-sample.warc.wet.gz"  # 69 records, some English pages
    cfg = DataConfig(inputs=[wet], text_sources={}, minhash=False, sentence_dedup=False, tasks=1, workers=1)
    corpus = data_task.fn(cfg, root)
    assert isinstance(corpus, CorpusRef) and not corpus.cached and corpus.profile()["docs"] > 0
    run = stage_run("data")
    assert run.data.params["languages"] == "['en']" and run.data.params["minhash"] == "False"
    assert run.data.metrics["data/totals.docs_out"] == corpus.profile()["docs"]
    assert {"manifest.json", "funnel.png", "samples"} <= artifacts(run)
    (crawl,) = run.inputs.dataset_inputs  # lineage: the crawl file, by name and content digest
    assert crawl.dataset.name == Path(wet).name and crawl.dataset.digest == path_sha256(resolve_path(wet))[:20]
    assert run.data.tags["output_sha256"] == corpus.sha256
    assert data_task.fn(cfg, root).cached and stage_run("data").data.tags["cached"] == "true"


def test_tokenizer_task(tokenizer):
    assert isinstance(tokenizer.shards, ShardsRef) and tokenizer.shards.sha256 and tokenizer.key
    run = stage_run("tokenizer")
    assert run.data.params["vocab_size"] == str(VOCAB)
    assert run.data.metrics["tokenizer/train_tokens"] == tokenizer.counts["train_tokens"] > 0
    assert {"manifest.json", "tokenizer", "index.json"} <= artifacts(run)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "corpus"


@pytest.mark.ray
@pytest.mark.slow
def test_pretrain_task(tokenizer, root, ray_once):  # the session's one Ray for the module's three fits, as in the pipeline
    cfg = PretrainConfig(model=GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=1, n_head=2, n_embd=32),
                         steps=4, batch_size=2, warmup_steps=1, num_workers=1, log_every=2, eval_every=4,
                         eval_batches=1, ckpt_every=4)
    model = pretrain_task.fn(cfg, tokenizer.shards, root)
    assert isinstance(model, ModelRef) and (model.dir / "model" / "model.safetensors").exists()
    run = stage_run("pretrain")
    assert "pretrain/final_train_loss" in run.data.metrics and run.data.params["model.n_layer"] == "1"
    assert {"manifest.json", "loss_curve.png", "history.json"} <= artifacts(run)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "token-shards" and json.loads(dataset.dataset.profile)["train_tokens"] > 0


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.ray
@pytest.mark.slow
def test_sft_and_align_tasks(tokenizer, base_model, root, tmp_path, ray_once):
    sft_data = _jsonl(tmp_path / "sft.jsonl", [{"instruction": f"add {i} and {i}", "input": "", "output": f"{2 * i}"}
                                               for i in range(20)])
    chat = sft_task.fn(SFTConfig(sources=sft_data, steps=2, batch_size=4, num_workers=1), base_model, tokenizer, root)
    run = stage_run("sft")
    tuned, base = load_model(Path(chat.path)).state_dict(), load_model(Path(base_model.path)).state_dict()
    assert any(not torch.equal(tuned[k], base[k]) for k in base) and "sft/val_loss_after" in run.data.metrics
    assert "train/loss" in run.data.metrics  # logged by the Ray worker through the stage's run link
    assert {"manifest.json", "loss_curve.png"} <= artifacts(run)
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"chosen": f"\n\nHuman: {i}?\n\nAssistant: yes.",
                                               "rejected": f"\n\nHuman: {i}?\n\nAssistant: no."} for i in range(12)])
    dpo = DPOConfig(sources=pairs, steps=2, batch_size=2, max_pairs=12, num_workers=1, log_every=1)
    aligned = dpo_task.fn(dpo, chat, tokenizer, root)
    run = stage_run("dpo")
    assert isinstance(aligned, ModelRef) and "dpo/val_loss_after" in run.data.metrics
    assert run.data.metrics["dpo/data/records"] == run.data.metrics["dpo/data/kept"] == 12  # loader counts
    assert "dpo/margin" in run.data.metrics  # logged by the Ray worker through the stage's run link
    assert {"manifest.json", "loss_curve.png", "margins.png", "history.json"} <= artifacts(run)
    manifest = json.loads(Path(aligned.manifest).read_text())
    assert manifest["inputs"]["model"]["sha256"] == chat.sha256  # lineage: the SFT model's hash, not re-derived


def test_decontam_task(root):
    corpus = CorpusRef(path=str(DATA_DIR / "text"))  # a folder of *.jsonl.gz documents, as the data stage writes
    sft = [SFTSource(path="data/sft/alpaca_en_demo.json.gz")]
    prefs = [PreferenceSource(path="data/preference/hh_rlhf_harmless_sample.jsonl.gz")]
    cfg = DecontamConfig(tasks=["arc_easy", "piqa"])
    report = decontam_task.fn(cfg, corpus, sft, prefs, root)
    assert isinstance(report, ContaminationReport) and report.fractions() == {"arc_easy": 0.0, "piqa": 0.0}
    run = stage_run("decontam")
    assert run.data.params["n"] == "13" and run.data.metrics["decontam/arc_easy/fraction"] == 0.0
    assert run.data.metrics["decontam/docs_sft_alpaca_en_demo"] == 999
    assert run.data.metrics["decontam/docs_preference_hh_rlhf_harmless_sample"] == 120  # 60 pairs: with the chosen, with the rejected reply
    assert {"manifest.json", "contamination.json", "contamination.md"} <= artifacts(run)
    assert decontam_task.fn(cfg, corpus, sft, prefs, root).cached


def test_eval_and_register_tasks(tokenizer, base_model, root):
    report = eval_task.fn(EvalConfig(tasks=["arc_easy", "piqa"], limit=4, batch_size=8), base_model, tokenizer, root)
    assert isinstance(report, EvalReport) and "arc_easy" in report.table
    run = stage_run("eval")
    assert any(k.startswith("eval/arc_easy/") for k in run.data.metrics)
    assert {"manifest.json", "results.md", "results.json", "results.png"} <= artifacts(run)
    registered = register_task.fn(RegistryConfig(model_name="gpt-test"), base_model, tokenizer,
                                  {"eval_status": "unchecked"})
    assert registered.name == "gpt-test" and registered.aliases == ["candidate"]
    version = MlflowClient().get_model_version_by_alias("gpt-test", "candidate")
    assert int(version.version) == registered.version and version.tags["eval_status"] == "unchecked"
