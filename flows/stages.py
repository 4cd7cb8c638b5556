"""Thin Prefect tasks around the stage cores, MLflow at their edges, and one flow per stage.

Each task: open the stage's nested MLflow run, call the core through `run_stage` (which skips a stage whose
inputs and parameters have not changed), log the manifest's params, counts and metrics and its small files.
The wrappers live here rather than in `tasks/` so that Ray workers, which import the cores, never import
Prefect. The cores that need torch (pretrain, SFT, align) are imported in their task, so that `gptflow data`
and the other torch-free stages start without it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from infra.env import resolve_path, runs_dir
from tasks import tracking
from tasks.align import AlignConfig
from tasks.bpe import TokenizerConfig, build_tokenizer
from tasks.data import DataConfig, data_stage
from tasks.evaluate import EvalConfig, evaluate_model
from tasks.pretrain import PretrainConfig
from tasks.sft import SFTConfig
from tasks.stage import run_stage


def _finish(run_id: str, manifest: dict, *files: str) -> dict:
    out = Path(manifest["dir"])
    tracking.log_manifest(run_id, manifest, [out / f for f in files])
    return manifest


@task(name="data", cache_policy=NO_CACHE)
def data_task(cfg: DataConfig, root: str, parent_run_id: str | None = None) -> dict:
    with tracking.stage_run("data", parent_run_id) as run_id:
        return _finish(run_id, data_stage(cfg, Path(root)), "funnel.png", "samples")


@task(name="tokenizer", cache_policy=NO_CACHE)
def tokenizer_task(cfg: TokenizerConfig, corpus: str, root: str, parent_run_id: str | None = None) -> dict:
    with tracking.stage_run("tokenizer", parent_run_id) as run_id:
        m = run_stage("tokenizer", cfg, {"corpus": Path(corpus)}, lambda out: build_tokenizer(cfg, Path(corpus), out), Path(root))
        tracking.log_dataset_input(run_id, "corpus", Path(corpus), m["inputs"]["corpus"]["sha256"], {}, "training")
        return _finish(run_id, m, "tokenizer", "shards/index.json")


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_task(cfg: PretrainConfig, shards: str, root: str, parent_run_id: str | None = None) -> dict:
    from tasks.pretrain import pretrain_gpt

    with tracking.stage_run("pretrain", parent_run_id) as run_id:
        uri = tracking.tracking_uri()
        m = run_stage("pretrain", cfg, {"shards": Path(shards)},
                      lambda out: pretrain_gpt(cfg, Path(shards), out, run_id=run_id, tracking_uri=uri), Path(root))
        index = json.loads((Path(shards) / "index.json").read_text())
        profile = {f"{s}_tokens": v["tokens"] for s, v in index["splits"].items()}
        tracking.log_dataset_input(run_id, "token-shards", Path(shards), m["inputs"]["shards"]["sha256"], profile, "training")
        return _finish(run_id, m, "loss_curve.png", "history.json", "model/config.json")


@task(name="sft", cache_policy=NO_CACHE)
def sft_task(cfg: SFTConfig, model: str, tokenizer: str, root: str, parent_run_id: str | None = None) -> dict:
    from tasks.sft import finetune_sft

    data = resolve_path(cfg.data)
    inputs = {"model": Path(model), "tokenizer": Path(tokenizer), "data": data}
    with tracking.stage_run("sft", parent_run_id) as run_id:
        m = run_stage("sft", cfg, inputs, lambda out: finetune_sft(cfg, Path(model), Path(tokenizer), data, out), Path(root))
        return _finish(run_id, m, "loss_curve.png", "history.json")


@task(name="align", cache_policy=NO_CACHE)
def align_task(cfg: AlignConfig, model: str, tokenizer: str, root: str, parent_run_id: str | None = None) -> dict:
    from tasks.align import align_dpo

    data = resolve_path(cfg.data)
    inputs = {"model": Path(model), "tokenizer": Path(tokenizer), "data": data}
    with tracking.stage_run("align", parent_run_id) as run_id:
        m = run_stage("align", cfg, inputs, lambda out: align_dpo(cfg, Path(model), Path(tokenizer), data, out), Path(root))
        return _finish(run_id, m, "loss_curve.png", "history.json")


@task(name="eval", cache_policy=NO_CACHE)
def eval_task(cfg: EvalConfig, model: str, tokenizer: str, root: str, parent_run_id: str | None = None) -> dict:
    data_dir = resolve_path(cfg.data_dir)
    inputs = {"model": Path(model), "tokenizer": Path(tokenizer), "benchmarks": data_dir}
    with tracking.stage_run("eval", parent_run_id) as run_id:
        m = run_stage("eval", cfg, inputs,
                      lambda out: evaluate_model(cfg, Path(model), Path(tokenizer), data_dir, out), Path(root))
        return _finish(run_id, m, "results.md", "results.json", "results.png")


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def register_task(model: str, tokenizer: str, name: str, aliases: list[str], tags: dict[str, str],
                  parent_run_id: str | None = None) -> dict:
    with tracking.stage_run("register", parent_run_id) as run_id:
        return tracking.register_model(run_id, Path(model), Path(tokenizer), name, aliases, tags)


# ---------------------------------------------------------------- one flow per stage (`gptflow <stage>`)


def _root(workdir: str | None) -> str:
    return str(Path(workdir).resolve() if workdir else runs_dir())


@flow(name="data", log_prints=True)
def data_flow(config: DataConfig = DataConfig(), workdir: str | None = None) -> dict:
    return data_task(config, _root(workdir))


@flow(name="tokenizer", log_prints=True)
def tokenizer_flow(corpus: str, config: TokenizerConfig = TokenizerConfig(), workdir: str | None = None) -> dict:
    return tokenizer_task(config, corpus, _root(workdir))


@flow(name="pretrain", log_prints=True)
def pretrain_flow(shards: str, config: PretrainConfig, workdir: str | None = None) -> dict:
    return pretrain_task(config, shards, _root(workdir))


@flow(name="sft", log_prints=True)
def sft_flow(model: str, tokenizer: str, config: SFTConfig = SFTConfig(), workdir: str | None = None) -> dict:
    return sft_task(config, model, tokenizer, _root(workdir))


@flow(name="align", log_prints=True)
def align_flow(model: str, tokenizer: str, config: AlignConfig = AlignConfig(), workdir: str | None = None) -> dict:
    return align_task(config, model, tokenizer, _root(workdir))


@flow(name="eval", log_prints=True)
def eval_flow(model: str, tokenizer: str, config: EvalConfig = EvalConfig(), workdir: str | None = None) -> dict:
    return eval_task(config, model, tokenizer, _root(workdir))


def timed(fn, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
