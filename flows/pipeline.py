"""The pipeline flow: data -> tokenizer -> pretrain -> SFT -> one branch per alignment method -> eval of every
model (base, SFT, each branch), side by side -> registry -> eval gate.

One typed line per stage: each task takes the refs of the stages before it and returns its own (`tasks/refs.py`).
One parent MLflow run per pipeline run (named `<preset>-<gitsha7>`), a nested run per stage (a model's eval
nests under the run of the stage that made it), the wall time of every stage as `time/<stage>_s` metrics on the
parent, the comparison table and chart (`results.md`, `results.png`) on the parent. Every branch is a version of
`gpt-<preset>` (alias = its method); the best one is the `candidate`, and the gate moves `champion` to it only
when it beats the champion by more than the standard error (`tasks/registry.py`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow

from eval.benchmarks import TASKS
from eval.decontam import clean_scores
from flows.config import PipelineConfig
from flows.presets import PresetName, resolve
from flows.report import publish_report
from flows.stages import (
    classify_task,
    data_task,
    decontam_task,
    dpo_task,
    eval_task,
    grpo_task,
    limited,
    ppo_task,
    pretrain_task,
    promote_task,
    register_task,
    reward_task,
    sft_task,
    timed,
    tokenizer_task,
)
from infra.env import runs_dir, workspace
from infra.ray_cluster import ray_session
from tasks import tracking
from tasks.conversations import PreferenceSource, SFTSource
from tasks.decontam import DecontamConfig
from tasks.evaluate import EvalConfig, clean_table, compare_chart, compare_reports
from tasks.model_card import card_facts, model_card
from tasks.pretrain import FitClock
from tasks.refs import ContaminationReport, EvalReport, ModelRef, RegisteredModel, TokenizerRef
from tasks.registry import Decision, best_branch, eval_setup, report_scores, version_tags


@flow(name="llm-pipeline", flow_run_name="pipeline-{preset}", log_prints=True)
def llm_pipeline_flow(preset: PresetName = "tiny", overrides: dict[str, Any] | None = None,
                      workdir: str | None = None, config: PipelineConfig | None = None) -> dict[str, Any]:
    """Run every stage of the pipeline for a preset; `overrides` are dotted keys (`pretrain.lr: 3e-4`). With
    `config` (the whole resolved config, as the typed deployments of `flows/deployments.py` pass it), `preset` and
    `overrides` are not used."""
    cfg = config if config is not None else resolve(preset, overrides or {})
    preset = cfg.preset
    limits = cfg.timeouts
    root = str(Path(workdir).resolve() if workdir else runs_dir())
    commit = tracking.git_sha()
    times: dict[str, float] = {}
    with tracking.pipeline_run(f"{preset}-{commit[:7]}", cfg.model_dump(mode="json"), {"preset": preset}) as parent:
        corpus, times["data"] = timed(data_task, cfg.data, root, parent)
        tok, times["tokenizer"] = timed(tokenizer_task, cfg.tokenizer, corpus, root, parent)
        # Ray starts once, here, for every Ray Train stage after it (each stage's own ray_session joins it), and
        # not before: the data stage forks (datatrove), which a local Ray's gRPC threads do not survive. Each fit
        # leaves its worker processes to the next one of the same shape (infra.ray_local.warm_workers).
        start = time.perf_counter()
        with ray_session(keep_workers=True):
            times["ray_start"] = time.perf_counter() - start
            base, times["pretrain"] = timed(limited(pretrain_task, limits), cfg.pretrain, tok.shards, root, parent)
            chat, times["sft"] = timed(limited(sft_task, limits), cfg.sft, base, tok, root, parent)
            branches, helpers = align_branches(cfg, chat, tok, root, parent, times)
            # every model of the run on the same benchmarks: the pretrained base, the SFT model (every branch's
            # baseline) and each branch; each eval run nests under the run of the stage that made the model
            contamination, times["decontam"] = timed(decontam_task, decontam_config(cfg), corpus,
                                                     *training_sources(cfg), root, parent)
            models = {"base": base, "sft": chat, **branches}
            reports: dict[str, EvalReport] = {}
            for name, model in models.items():
                reports[name], times[f"eval_{name}"] = timed(limited(eval_task, limits), eval_config(cfg, name), model, tok, root,
                                                             model.run_id or parent, name)
            clean = clean_tables(reports, contamination)
            refs = {"data": corpus, "tokenizer": tok, "pretrain": base, "sft": chat, **helpers, **branches}
            registered, decision = register_branches(cfg, preset, commit, root, parent, branches, tok, reports, refs,
                                                     contamination, times)
            if cfg.run_classify:  # a side branch from the pretrained model: GPT-1 task fine-tuning, its own model
                classifier, times["classify"] = timed(limited(classify_task, limits), cfg.classify, base, tok, root, parent)
                tracking.log_metrics(parent, classifier.metrics)
        table = compare_reports(reports)
        chart = compare_chart(reports, Path(root) / "compare" / parent / "results.png")
        times["total"] = sum(times.values())
        tracking.log_metrics(parent, {f"time/{k}_s": v for k, v in times.items()})
        tracking.log_metrics(parent, base.metrics | chat.metrics)
        for model in branches.values():
            tracking.log_metrics(parent, model.metrics)
        for name, report in reports.items():  # sft/eval/arc_easy/acc, dpo/eval/arc_easy/acc, ...
            tracking.log_metrics(parent, {f"{name}/{k}": v for k, v in report.metrics.items()})
        tracking.log_text(parent, table, "results.md")
        tracking.log_artifact(parent, chart)
        tracking.log_text(parent, decision.reason + "\n", "promotion.md")
        tracking.log_text(parent, contamination.table() + "\n" + clean, "contamination.md")
        print(f"eval of every model of this run (Markdown: results.md, chart: results.png):\n{table}")
    refs |= {"decontam": contamination, **{f"eval_{name}": report for name, report in reports.items()}}
    # the run report, from the finished run's records: report.md/.html on the run, Prefect artifacts on the flow run
    report = publish_report(parent, Path(root) / "reports" / parent)
    return {
        "report": str(report),
        "run_id": parent,
        "tracking_uri": tracking.tracking_uri(),
        "experiment": tracking.EXPERIMENT,
        "model": registered[decision.method].model_dump(),
        "decision": decision.model_dump(),
        "models": {name: reg.model_dump() for name, reg in registered.items()},
        "times": times,
        "fit_clocks": fit_clocks(refs),
        "core_seconds": {s: ref.seconds for s, ref in refs.items() if not ref.cached},  # the stages' pure cores
        "cached": {s: ref.cached for s, ref in refs.items()},
        "stage_dirs": {s: str(ref.dir) for s, ref in refs.items()},
        "eval_table": table,
        "eval_tables": {name: report.table for name, report in reports.items()},
    }


def fit_clocks(refs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each Ray Train stage's fit in this run, split: `fit_seconds`, `fit_startup_seconds`, `fit_end_seconds`
    (`tasks.pretrain.FitClock`), from its model's metrics; a stage reused from an earlier run made no fit."""
    return {stage: {name: ref.metrics[f"{stage}/{name}"] for name in FitClock.NAMES}
            for stage, ref in refs.items() if not ref.cached and f"{stage}/fit_seconds" in ref.metrics}


def register_branches(cfg: PipelineConfig, preset: str, commit: str, root: str, parent: str,
                      branches: dict[str, ModelRef], tok: TokenizerRef, reports: dict[str, EvalReport],
                      refs: dict[str, Any], contamination: ContaminationReport, times: dict[str, float]) -> tuple[dict[str, RegisteredModel], Decision]:
    """Each branch as a version of the preset's registered model (alias = its method), then the eval gate on the
    best of them (`tasks.registry`): `candidate` on it, `champion` when it beats the champion."""
    reg = cfg.registration
    setup = eval_setup(reports[next(iter(branches))])
    scores = {name: report_scores(reports[name]) for name in branches}
    registered, cards = {}, {}
    for name, model in branches.items():
        tags = {**version_tags(preset, commit, parent, {**refs, "eval": reports[name]}, reports[name],
                               setup, cfg.model_dump(mode="json")), "align_method": name}
        facts = card_facts(lineage_refs(refs, name, reports[name]), name)
        cards[name] = model_card(reg.model_name or f"gpt-{preset}", facts, scores[name], contamination.fractions())
        registered[name], times[f"register_{name}"] = timed(
            register_task, reg.model_copy(update={"aliases": [name]}), model, tok, tags, parent, name, cards[name],
            facts.datasets)
    best = best_branch(scores, reg.gate_metrics[0])
    champion_scores = None
    champion = tracking.alias_version(registered[best].name, reg.champion_alias)
    if champion and champion[0] != registered[best].version and champion[1].get("eval_setup") != setup:
        # the champion was scored under another setup: score it again under this one before comparing
        model, tokenizer = tracking.download_model(f"models:/{registered[best].name}/{champion[0]}",
                                                   workspace() / "cache" / "registered")
        report, times["eval_champion"] = timed(eval_task, eval_config(cfg, "champion"), ModelRef(path=str(model)),
                                               TokenizerRef(path=str(tokenizer)), root, parent, "champion")
        champion_scores = report_scores(report)
    decision, times["promote"] = timed(promote_task, reg, registered[best], best, scores[best], setup,
                                       contamination.fractions(), parent, champion_scores, cards[best])
    return registered, decision.model_copy(update={"method": best})


def lineage_refs(refs: dict[str, Any], branch: str, report: EvalReport) -> dict[str, Any]:
    """The stages that made one branch's model, in order: data to SFT, the reward model for PPO, the branch, and
    its evaluation (the benchmarks)."""
    made = ["data", "tokenizer", "pretrain", "sft", *(["reward"] if branch == "ppo" else []), branch]
    return {**{s: refs[s] for s in made if s in refs}, "eval": report}


def eval_config(cfg: PipelineConfig, model: str) -> EvalConfig:
    """The eval stage's config for one of the run's models: chat models (all but the pretrained base) are
    prompted through their chat template unless `eval.chat_template` says otherwise."""
    if cfg.eval.chat_template is not None:
        return cfg.eval
    return cfg.eval.model_copy(update={"chat_template": model != "base"})


def decontam_config(cfg: PipelineConfig) -> DecontamConfig:
    """The decontamination check of exactly the benchmarks the eval stage scores."""
    return cfg.decontam.model_copy(update={"data_dir": cfg.eval.data_dir,
                                           "tasks": [t for t in cfg.eval.tasks if t in TASKS]})


def training_sources(cfg: PipelineConfig) -> tuple[list[SFTSource], list[PreferenceSource]]:
    """The chat and preference data this run trains on: SFT's, and each alignment method's."""
    sft, pairs = list(cfg.sft.sources), []
    if "dpo" in cfg.align.methods:
        pairs += cfg.align.dpo.sources
    if "ppo" in cfg.align.methods:
        pairs += cfg.align.reward.sources
        sft += cfg.align.ppo.sources
    return sft, pairs


def clean_tables(reports: dict[str, EvalReport], contamination: ContaminationReport) -> str:
    """Each model's scores on each task's clean subset (the items no training text shares an n-gram with), logged
    to its eval run as `clean/<task>/<metric>`; returns the Markdown table of every model's acc, all and clean."""
    dirty = contamination.contaminated()
    clean = {name: clean_scores(r.dir / "samples", {t: dirty.get(t, []) for t in r.tasks()})
             for name, r in reports.items()}
    for name, scores in clean.items():
        tracking.log_metrics(reports[name].run_id, {f"clean/{t}/{m}": v for t, ms in scores.items()
                                                    for m, v in ms.items()})
    return clean_table(reports, clean)


def align_branches(cfg: PipelineConfig, chat: ModelRef, tok: TokenizerRef, root: str, parent: str,
                   times: dict[str, float]) -> tuple[dict[str, ModelRef], dict[str, ModelRef]]:
    """Each alignment method of `cfg.align.methods`, every one from the same SFT model. Returns the branches
    ({method: its model}) and the models they were trained against ({"reward": the reward model} for PPO)."""
    branches: dict[str, ModelRef] = {}
    helpers: dict[str, ModelRef] = {}
    for method in cfg.align.methods:
        if method == "dpo":
            branches["dpo"], times["dpo"] = timed(limited(dpo_task, cfg.timeouts), cfg.align.dpo, chat, tok, root, parent)
        elif method == "ppo":  # InstructGPT: a reward model from ranked pairs, then PPO against it
            helpers["reward"], times["reward"] = timed(limited(reward_task, cfg.timeouts), cfg.align.reward, chat, tok, root, parent)
            branches["ppo"], times["ppo"] = timed(limited(ppo_task, cfg.timeouts), cfg.align.ppo, chat, tok, helpers["reward"], root, parent)
        elif method == "grpo":
            branches["grpo"], times["grpo"] = timed(limited(grpo_task, cfg.timeouts), cfg.align.grpo, chat, tok, root, parent)
        else:
            raise ValueError(f"align.methods: unknown method {method!r}")
    return branches, helpers
