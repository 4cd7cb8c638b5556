"""Thin Prefect tasks around the stage cores, MLflow at their edges, and one flow per stage.

Every stage task goes through `tracked_stage`, the one place that calls `run_stage` (content-addressed folder,
reuse of a finished one, `_SUCCESS` last) and opens the stage's nested MLflow run. A task names its inputs and
calls its core; it holds no logic of its own. The wrappers live here rather than in `tasks/` so that Ray
workers, which import the cores, never import Prefect. The cores that need torch (pretrain, SFT, align, eval)
are imported in their task, so `gptflow data` and the other torch-free stages start without it.

Adding a stage: a config and a core `verb_object(cfg, inputs..., out_dir) -> Ref` in `tasks/<stage>.py`, a
task here of the same shape as the others, and one line in `flows/pipeline.py` (README, "Adding a stage").
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prefect import Task, flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.config import DAY_S, TimeoutsConfig
from flows.presets import tiny
from infra.env import resolve_path, runs_dir, workspace
from tasks import tracking
from tasks.classify import ClassifyConfig
from tasks.conversations import PreferenceSource, SFTSource
from tasks.data import DataConfig, build_corpus, crawl_inputs
from tasks.decontam import DecontamConfig, check_contamination
from tasks.dpo import DPOConfig
from tasks.evaluate import EvalConfig
from tasks.grpo import GRPOConfig
from tasks.model_card import DatasetFacts, model_card
from tasks.ppo import PPOConfig
from tasks.pretrain import PretrainConfig
from tasks.refs import (
    ContaminationReport,
    CorpusRef,
    EvalReport,
    InputRef,
    ModelRef,
    Ref,
    RegisteredModel,
    RunLink,
    ShardsRef,
    TokenizerRef,
)
from tasks.registry import Decision, RegistryConfig, Score, decide, decision_tags, describe
from tasks.reward import RewardConfig
from tasks.sft import SFTConfig
from tasks.stage import GptflowError, as_input, run_stage
from tasks.tokenizer import TokenizerConfig, build_tokenizer

TINY = tiny()  # the stage flows' defaults where a stage has no standalone default (pretraining's model)

# IO that can flake (the registry, downloads): a few tries, further apart each time; compute is never retried.
IO_RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": [2, 10, 30]}


def run_name(stage: str) -> Callable[..., str]:
    """A task run's name in the Prefect UI: the stage, then the branch it worked on when it has one (`eval-sft`)."""
    def name(parameters: dict[str, Any]) -> str:
        branch = parameters.get("branch")
        return f"{stage}-{branch}" if branch else stage
    return name


def limited(stage_task: Task, timeouts: TimeoutsConfig) -> Task:
    """The training or eval task with its limit from the pipeline's config (`timeouts.<stage>`)."""
    return stage_task.with_options(timeout_seconds=getattr(timeouts, stage_task.name))


def tracked_stage(stage: str, cfg: BaseModel, inputs: Mapping[str, Ref], core: Callable[[Path, RunLink], Ref],
                  root: str, parent_run_id: str | None, branch: str | None = None,
                  then: Callable[[str, Ref], None] | None = None) -> Ref:
    """Run `core(out_dir, run_link)` through `run_stage` inside the stage's MLflow run; log what it made.
    `branch` names which model a stage that runs once per branch worked on (eval: `sft`, `dpo`, `ppo`, ...):
    its MLflow run is then `<stage>-<branch>`, tagged `branch`. `then(run_id, ref)` runs last, in the same run
    (the stages that register their own model)."""
    run_name = f"{stage}-{branch}" if branch else stage
    with tracking.stage_run(run_name, parent_run_id, {"stage": stage, "branch": branch} if branch else None) as run_id:
        link = RunLink(run_id=run_id, tracking_uri=tracking.tracking_uri())

        def computing(out: Path) -> Ref:  # a later run that reuses the folder links to this one (its curves)
            (out / tracking.COMPUTED_IN).write_text(run_id)
            return core(out, link)

        ref = run_stage(stage, cfg, inputs, computing, Path(root))
        tracking.log_stage(run_id, ref, cfg, inputs)
        if then is not None:
            then(run_id, ref)
        return ref.model_copy(update={"run_id": run_id})


def registers(stage: str, register: Callable[..., RegisteredModel], tokenizer: TokenizerRef,
              name: str) -> Callable[[str, Ref], None]:
    """A `then` for `tracked_stage`: register the stage's model from its run as `name` (alias `candidate`)."""
    def then(run_id: str, ref: Ref) -> None:
        registered = register(run_id, ref, tokenizer, name, {"stage_key": ref.key})
        print(f"[{stage}] registered {registered.name} version {registered.version}: models:/{registered.name}@candidate")

    return then


@task(name="data", task_run_name=run_name("data"), cache_policy=NO_CACHE)
def data_task(cfg: DataConfig, root: str, parent_run_id: str | None = None) -> CorpusRef:
    inputs = crawl_inputs(cfg)  # listings expanded, every file asked about once
    # with decontaminate on, the benchmark files' content joins the stage key (they are no reader's input)
    keyed = {**inputs, "benchmarks": as_input(cfg.decontaminate_benchmarks)} if cfg.decontaminate else inputs
    return tracked_stage("data", cfg, keyed, lambda out, _: build_corpus(cfg, inputs, out), root, parent_run_id)


@task(name="tokenizer", task_run_name=run_name("tokenizer"), cache_policy=NO_CACHE)
def tokenizer_task(cfg: TokenizerConfig, corpus: CorpusRef, root: str, parent_run_id: str | None = None) -> TokenizerRef:
    return tracked_stage("tokenizer", cfg, {"corpus": corpus}, lambda out, _: build_tokenizer(cfg, corpus, out),
                         root, parent_run_id)


@task(name="pretrain", task_run_name=run_name("pretrain"), cache_policy=NO_CACHE, timeout_seconds=DAY_S)
def pretrain_task(cfg: PretrainConfig, shards: ShardsRef, root: str, parent_run_id: str | None = None) -> ModelRef:
    from tasks.pretrain import pretrain_gpt

    return tracked_stage("pretrain", cfg, {"shards": shards}, lambda out, run: pretrain_gpt(cfg, shards, out, run),
                         root, parent_run_id)


def source_inputs(sources, prefix: str = "data") -> dict[str, Ref]:
    """Every source as a stage input: a local file by its content, a Hub dataset by its spec (name, split, ...)."""
    refs: dict[str, Ref] = {}
    for s in sources:
        local = resolve_path(s.path).exists()
        spec = hashlib.sha256(s.model_dump_json().encode()).hexdigest()
        refs[f"{prefix}_{s.label}"] = as_input(s.path) if local else InputRef(path=s.path, sha256=spec)
    return refs


@task(name="sft", task_run_name=run_name("sft"), cache_policy=NO_CACHE, timeout_seconds=DAY_S)
def sft_task(cfg: SFTConfig, model: ModelRef, tokenizer: TokenizerRef, root: str,
             parent_run_id: str | None = None) -> ModelRef:
    from tasks.sft import finetune_sft

    inputs = {"model": model, "tokenizer": tokenizer, **source_inputs(cfg.sources)}
    return tracked_stage("sft", cfg, inputs, lambda out, run: finetune_sft(cfg, model, tokenizer, out, run),
                         root, parent_run_id)


@task(name="dpo", task_run_name=run_name("dpo"), cache_policy=NO_CACHE, timeout_seconds=DAY_S)
def dpo_task(cfg: DPOConfig, model: ModelRef, tokenizer: TokenizerRef, root: str,
             parent_run_id: str | None = None) -> ModelRef:
    from tasks.dpo import train_dpo

    inputs = {"model": model, "tokenizer": tokenizer, **source_inputs(cfg.sources)}
    return tracked_stage("dpo", cfg, inputs, lambda out, run: train_dpo(cfg, model, tokenizer, out, run),
                         root, parent_run_id)


@task(name="ppo", task_run_name=run_name("ppo"), cache_policy=NO_CACHE, timeout_seconds=DAY_S)
def ppo_task(cfg: PPOConfig, model: ModelRef, tokenizer: TokenizerRef, reward: ModelRef | None, root: str,
             parent_run_id: str | None = None) -> ModelRef:
    """PPO from the SFT `model` against the `reward` model (None: the toy `cfg.reward_token`)."""
    from tasks.ppo import train_ppo

    inputs = {"model": model, "tokenizer": tokenizer, **({"reward": reward} if reward else {}), **source_inputs(cfg.sources)}
    return tracked_stage("ppo", cfg, inputs, lambda out, run: train_ppo(cfg, model, tokenizer, out, run, reward=reward),
                         root, parent_run_id)


@task(name="grpo", task_run_name=run_name("grpo"), cache_policy=NO_CACHE, timeout_seconds=DAY_S)
def grpo_task(cfg: GRPOConfig, model: ModelRef, tokenizer: TokenizerRef, root: str,
              parent_run_id: str | None = None) -> ModelRef:
    from tasks.grpo import train_grpo

    inputs = {"model": model, "tokenizer": tokenizer}
    if cfg.prompts_file:
        inputs["prompts"] = as_input(cfg.prompts_file)
    return tracked_stage("grpo", cfg, inputs, lambda out, run: train_grpo(cfg, model, tokenizer, out, run),
                         root, parent_run_id)


@task(name="classify", task_run_name=run_name("classify"), cache_policy=NO_CACHE, timeout_seconds=DAY_S)
def classify_task(cfg: ClassifyConfig, model: ModelRef, tokenizer: TokenizerRef, root: str,
                  parent_run_id: str | None = None) -> ModelRef:
    """GPT-1 task fine-tuning in its own run, the classifier registered from that run as `cfg.model_name`."""
    from tasks.classify import finetune_classifier

    inputs = {"model": model, "tokenizer": tokenizer, "data": as_input(cfg.data)}
    return tracked_stage("classify", cfg, inputs, lambda out, _: finetune_classifier(cfg, model, tokenizer, out), root,
                         parent_run_id, then=registers("classify", tracking.register_classifier, tokenizer, cfg.model_name))


@task(name="reward", task_run_name=run_name("reward"), cache_policy=NO_CACHE, timeout_seconds=DAY_S)
def reward_task(cfg: RewardConfig, model: ModelRef, tokenizer: TokenizerRef, root: str,
                parent_run_id: str | None = None) -> ModelRef:
    """The reward model (Bradley-Terry on ranked pairs) in its own run, registered from that run as `cfg.model_name`."""
    from tasks.reward import train_reward_model

    inputs = {"model": model, "tokenizer": tokenizer, **source_inputs(cfg.sources)}
    return tracked_stage("reward", cfg, inputs, lambda out, run: train_reward_model(cfg, model, tokenizer, out, run),
                         root, parent_run_id,
                         then=registers("reward", tracking.register_reward_model, tokenizer, cfg.model_name))


@task(name="eval", task_run_name=run_name("eval"), cache_policy=NO_CACHE, timeout_seconds=DAY_S)
def eval_task(cfg: EvalConfig, model: ModelRef, tokenizer: TokenizerRef, root: str,
              parent_run_id: str | None = None, branch: str | None = None) -> EvalReport:
    from tasks.evaluate import evaluate_model

    inputs = {"model": model, "tokenizer": tokenizer, "benchmarks": as_input(cfg.data_dir)}
    return tracked_stage("eval", cfg, inputs, lambda out, _: evaluate_model(cfg, model, tokenizer, out),
                         root, parent_run_id, branch)


@task(name="decontam", task_run_name=run_name("decontam"), cache_policy=NO_CACHE)
def decontam_task(cfg: DecontamConfig, corpus: CorpusRef, sft_sources: list[SFTSource],
                  preference_sources: list[PreferenceSource], root: str,
                  parent_run_id: str | None = None) -> ContaminationReport:
    """Benchmark items found in this run's corpus, SFT and preference data (before promotion)."""
    inputs = {"corpus": corpus, "benchmarks": as_input(cfg.data_dir), **source_inputs(sft_sources, "sft"),
              **source_inputs(preference_sources, "preference")}
    return tracked_stage("decontam", cfg, inputs,
                         lambda out, _: check_contamination(cfg, corpus, sft_sources, preference_sources, out),
                         root, parent_run_id)


@task(name="register", task_run_name=run_name("register"), cache_policy=NO_CACHE, **IO_RETRIES)
def register_task(cfg: RegistryConfig, model: ModelRef, tokenizer: TokenizerRef, tags: dict[str, str],
                  parent_run_id: str | None = None, branch: str | None = None, card: str = "",
                  datasets: list[DatasetFacts] | None = None) -> RegisteredModel:
    """Not a cached stage: registers a version unless these weights and tokenizer already are one (retried:
    registry IO). `card`: the model card (`tasks.model_card`); `datasets`: the lineage behind the model."""
    name = f"register-{branch}" if branch else "register"
    with tracking.stage_run(name, parent_run_id, {"branch": branch} if branch else None) as run_id:
        registered = tracking.register_model(run_id, model, tokenizer, cfg, tags, card, datasets or [])
        verb = "is already" if registered.reused else "registered as"
        print(f"[register] {branch or 'model'} {verb} {registered.name} version {registered.version}")
        return registered


@task(name="promote", task_run_name=run_name("promote"), cache_policy=NO_CACHE, **IO_RETRIES)
def promote_task(cfg: RegistryConfig, registered: RegisteredModel, method: str, scores: dict[str, Score],
                 setup: str, contamination: dict[str, float] | None = None, parent_run_id: str | None = None,
                 champion_scores: dict[str, Score] | None = None, card: str = "") -> Decision:
    """The eval gate (`tasks.registry.decide`) on this run's best branch: `candidate` on it, `champion` when it
    beats the champion; the decision, both sides' numbers and the model card (`card`, or the scores and the
    contamination report) on the version."""
    with tracking.stage_run("promote", parent_run_id, {"branch": method}) as run_id, \
            tracking.registry_lock(registered.name):  # the champion read is the one the alias moves from
        champion = tracking.alias_version(registered.name, cfg.champion_alias)
        decision = decide(scores, setup, champion[1] if champion else None, champion[0] if champion else None,
                          registered.version, list(cfg.gate_metrics), champion_scores)
        tags = decision_tags(decision) | {f"contamination.{t}": f"{f:.4f}" for t, f in (contamination or {}).items()}
        card = card or model_card(registered.name, None, scores, contamination)  # no card: the scores alone
        text = describe(registered.name, registered.version, method, decision, card)
        # already the champion (a rerun, or a second run at once): the version keeps the record of the gate that
        # made it champion; this decision is on the promote run
        kept = decision.outcome == "already-champion"
        tracking.record_gate(registered.name, registered.version, list(cfg.aliases), cfg.champion_alias,
                             decision.promote, {} if kept else tags, None if kept else text)
        tracking.log_params(run_id, {"candidate_version": registered.version, "outcome": decision.outcome,
                                     "gate_metrics": ",".join(cfg.gate_metrics)})
        tracking.log_text(run_id, text, "decision.md")
        where = f"models:/{registered.name}@{cfg.champion_alias}"
        print(f"[promote] {registered.name} version {registered.version} ({method}): {decision.outcome}: "
              f"{decision.reason}; {where}")
        return decision


# ---------------------------------------------------------------- one flow per stage (`gptflow <stage>`)


def _root(workdir: str | None) -> str:
    return str(Path(workdir).resolve() if workdir else runs_dir())


@flow(name="data", log_prints=True)
def data_flow(config: DataConfig = DataConfig(), workdir: str | None = None) -> CorpusRef:
    return data_task(config, _root(workdir))


@flow(name="tokenizer", log_prints=True)
def tokenizer_flow(corpus: str, config: TokenizerConfig = TokenizerConfig(), workdir: str | None = None) -> TokenizerRef:
    return tokenizer_task(config, CorpusRef(path=corpus), _root(workdir))


@flow(name="pretrain", log_prints=True)
def pretrain_flow(shards: str, config: PretrainConfig = TINY.pretrain, workdir: str | None = None) -> ModelRef:
    """Pretrain on a tokenizer stage's `shards/` folder; the default config is the tiny preset's (a 2,048-token
    vocabulary: raise config.model.vocab_size for a larger tokenizer's shards)."""
    return pretrain_task(config, ShardsRef(path=shards), _root(workdir))


@flow(name="pretrain-eval", log_prints=True)
def pretrain_eval_flow(data: DataConfig = TINY.data, tokenizer: TokenizerConfig = TINY.tokenizer,
                       pretrain: PretrainConfig = TINY.pretrain, eval: EvalConfig = TINY.eval,
                       workdir: str | None = None) -> EvalReport:
    """Data, tokenizer, pretraining and the base model's eval (the weekly deployment). The data and tokenizer
    stages are reused when the nightly refresh already made them from the same inputs."""
    root = _root(workdir)
    corpus = data_task(data, root)
    tok = tokenizer_task(tokenizer, corpus, root)
    model = pretrain_task(pretrain, tok.shards, root)
    return eval_task(eval, model, tok, root, model.run_id, "base")


@flow(name="sft", log_prints=True)
def sft_flow(model: str, tokenizer: str, config: SFTConfig = SFTConfig(), workdir: str | None = None) -> ModelRef:
    return sft_task(config, ModelRef(path=model), TokenizerRef(path=tokenizer), _root(workdir))


@flow(name="ppo", log_prints=True)
def ppo_flow(model: str, tokenizer: str, reward_model: str | None = None, config: PPOConfig = PPOConfig(),
             workdir: str | None = None) -> ModelRef:
    reward = ModelRef(path=reward_model) if reward_model else None
    return ppo_task(config, ModelRef(path=model), TokenizerRef(path=tokenizer), reward, _root(workdir))


@flow(name="dpo", log_prints=True)
def dpo_flow(model: str, tokenizer: str, config: DPOConfig = DPOConfig(), workdir: str | None = None) -> ModelRef:
    return dpo_task(config, ModelRef(path=model), TokenizerRef(path=tokenizer), _root(workdir))


@flow(name="grpo", log_prints=True)
def grpo_flow(model: str, tokenizer: str, config: GRPOConfig = GRPOConfig(), workdir: str | None = None) -> ModelRef:
    return grpo_task(config, ModelRef(path=model), TokenizerRef(path=tokenizer), _root(workdir))


@flow(name="classify", log_prints=True)
def classify_flow(model: str, tokenizer: str, config: ClassifyConfig = ClassifyConfig(),
                  workdir: str | None = None) -> ModelRef:
    return classify_task(config, ModelRef(path=model), TokenizerRef(path=tokenizer), _root(workdir))


@flow(name="reward", log_prints=True)
def reward_flow(model: str, tokenizer: str, config: RewardConfig = RewardConfig(), workdir: str | None = None) -> ModelRef:
    return reward_task(config, ModelRef(path=model), TokenizerRef(path=tokenizer), _root(workdir))


@flow(name="eval", log_prints=True)
def eval_flow(model: str, tokenizer: str, config: EvalConfig = EvalConfig(), workdir: str | None = None) -> EvalReport:
    return eval_task(config, ModelRef(path=model), TokenizerRef(path=tokenizer), _root(workdir))


@task(name="download", task_run_name="download", cache_policy=NO_CACHE, **IO_RETRIES)
def download_task(uri: str) -> tuple[ModelRef, TokenizerRef]:
    """A registered model's model and tokenizer folders, downloaded once per version (retried: registry IO)."""
    try:
        model, tokenizer = tracking.download_model(uri, workspace() / "cache" / "registered")
    except ValueError as e:  # no such name, alias or version: retrying will not make it exist
        raise GptflowError(str(e)) from None
    return ModelRef(path=str(model)), TokenizerRef(path=str(tokenizer))


@flow(name="eval-registered", log_prints=True)
def eval_registered_flow(model: str = "models:/gpt-tiny@champion",
                         config: EvalConfig = EvalConfig(chat_template=True), workdir: str | None = None) -> EvalReport:
    """Evaluate a registered model version (`models:/NAME@ALIAS` or `models:/NAME/VERSION`) on the benchmarks,
    logged to MLflow as an `eval-registered` run with the model's URI as a param. Registered models are chat models,
    so prompts go through the chat template by default."""
    if not model.startswith("models:/"):
        raise GptflowError(f"model: expected models:/NAME@ALIAS or models:/NAME/VERSION, got {model!r}")
    weights, tokenizer = download_task(model)
    report = eval_task(config, weights, tokenizer, _root(workdir), None, "registered")
    tracking.log_params(report.run_id, {"registered_model": model})
    return report


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
