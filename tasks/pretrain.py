"""Pretraining stage: a GPT trained on the token shards with Ray Train (DDP or FSDP over workers), resumable.

In: `shards/` from the tokenizer stage. Out: `model/` (`model.safetensors`, `config.json`), the loss curve
(`loss_curve.png`, `history.json`) and Ray Train checkpoints under `ray/`. A run that is killed resumes
from its latest checkpoint when it is started again with the same inputs and parameters (same stage folder,
same Ray `RunConfig(name, storage_path)`), and the resumed loss curve equals the uninterrupted one: checkpoints
hold the weights, the AdamW state, each rank's torch RNG and the step, and the data windows are a function of
(seed, step, rank). The loop each worker runs is `tasks/train_worker.py`. Run alone:
`gptflow pretrain --input SHARDS_DIR`.

This module imports no torch (the CLI, the presets and Prefect's parameter schemas read `PretrainConfig`);
the driver brings in Ray, and the workers torch.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import Field, model_validator

from models.config import GPTConfig
from tasks.plots import plot_loss
from tasks.refs import ModelRef, RunLink, ShardsRef
from tasks.stage import GptflowError
from tasks.train_config import TrainOptions


class PretrainConfig(TrainOptions):
    model: GPTConfig = Field(description="The GPT architecture; vocab_size must hold the tokenizer's vocabulary.")
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch per worker.")
    batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens per optimizer step (GPT-3 at 125M: 524,288); grad_accum then follows from it as "
        "batch_tokens / (num_workers * batch_size * block_size), which must be a whole number. None: use grad_accum.",
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay on matrices (GPT-3: 0.1).")
    eval_batches: int = Field(4, ge=1, description="Validation micro-batches per evaluation.")
    time_budget_s: float | None = Field(
        None,
        gt=0,
        description="Wall-clock budget of the training steps in seconds (logging, evaluation and checkpoints not "
        "counted), as speedrun recipes compare: training stops at the first step that ends past it, and the "
        "learning-rate schedule follows the clock (its position is elapsed / budget * steps, so the decay reaches "
        "its floor at the budget). `steps` then only shapes the schedule and caps the run. None: train `steps` steps.",
    )
    max_passes: float = Field(
        4.0,
        gt=0,
        description="Most passes over the training tokens the schedule may make before the stage refuses to "
        "start (Muennighoff et al. 2023: up to ~4 epochs of repeated data cost about as little as fresh data).",
    )
    allow_repeats: bool = Field(False, description="Train even when the schedule makes more than max_passes passes.")
    memory_check: bool = Field(
        True,
        description="Before the Ray fit, estimate the memory the workers need on this machine (models/plan.py: "
        "fp32 weights, grads and AdamW on CPU, bf16 mixed precision on GPU, plus one micro-batch's activations) "
        "and stop with the numbers when it exceeds what is available. Skipped on a Ray cluster (RAY_ADDRESS).",
    )
    heldout_bpb: bool = Field(
        False,
        description="After training, bits per byte of the whole validation split, every token predicted once in "
        "windows of the model's context (`pretrain/heldout_bpb`; tasks/heldout.py), in the driver. Off by default: "
        "on a large corpus it is a pass over every validation token.",
    )
    heldout_stride: int | None = Field(
        None,
        ge=1,
        description="Tokens between the held-out windows' starts: each window scores only the tokens the one before "
        "did not, so every token is still predicted once, with at least context - stride tokens before it. None: "
        "the context (non-overlapping windows). Below the context, the non-overlapping score is logged beside it "
        "as `pretrain/heldout_bpb_disjoint`.",
    )

    @model_validator(mode="after")
    def _check_batch_tokens(self) -> PretrainConfig:
        if self.batch_tokens is None:
            return self
        per_micro = self.num_workers * self.batch_size * self.model.block_size
        if self.batch_tokens % per_micro:
            raise ValueError(
                f"batch_tokens ({self.batch_tokens:,}) must be a multiple of num_workers * batch_size * block_size "
                f"({self.num_workers} * {self.batch_size} * {self.model.block_size} = {per_micro:,})"
            )
        if self.grad_accum not in (1, self.batch_tokens // per_micro):
            raise ValueError(f"batch_tokens ({self.batch_tokens:,}) asks for {self.batch_tokens // per_micro} "
                             f"micro-batches per step but grad_accum is {self.grad_accum}: set one of the two")
        return self

    @model_validator(mode="after")
    def _check_heldout_stride(self) -> PretrainConfig:
        if self.heldout_stride is not None and self.heldout_stride > self.model.block_size:
            raise ValueError(f"heldout_stride ({self.heldout_stride}) must not exceed the context, "
                             f"model.block_size ({self.model.block_size}): a token would go unscored")
        return self

    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimizer step on each worker: from batch_tokens when it is set, else grad_accum."""
        if self.batch_tokens is None:
            return self.grad_accum
        return self.batch_tokens // (self.num_workers * self.batch_size * self.model.block_size)

    @property
    def tokens_per_step(self) -> int:
        return self.num_workers * self.batch_size * self.accum_steps * self.model.block_size


# ---------------------------------------------------------------- the data budget


def check_data_budget(cfg: PretrainConfig, train_tokens: int, where: str = "the shards") -> float:
    """Passes the schedule makes over `train_tokens`; a one-line error with the numbers when they exceed
    `cfg.max_passes` and repeats are not allowed. Under a time budget `steps` is the cap, so this is the most."""
    planned = cfg.steps * cfg.tokens_per_step
    passes = planned / max(train_tokens, 1)
    if passes > cfg.max_passes and not cfg.allow_repeats:
        raise GptflowError(
            f"pretraining would read {planned:,} tokens ({cfg.steps:,} steps x {cfg.tokens_per_step:,} tokens) but "
            f"{where} hold {train_tokens:,} training tokens: {passes:,.1f} passes, over pretrain.max_passes="
            f"{cfg.max_passes:g}; add data (data.inputs, data.max_files), lower pretrain.steps, or set "
            "pretrain.allow_repeats=true"
        )
    return passes


# ---------------------------------------------------------------- memory


def worker_memory_bytes(cfg: PretrainConfig) -> dict[str, float]:
    """One worker's estimated peak: model states (fp32 weights, grads and AdamW's two moments = 16 bytes a
    parameter on CPU; bf16 weights and grads with fp32 master weights and moments on GPU, also 16) over the
    workers when FSDP shards them, plus one micro-batch's activations (16-bit estimate, doubled in fp32 on CPU)."""
    from models.plan import activation_bytes, param_count, training_memory_bytes

    n = param_count(cfg.model)
    cpu = not cfg.use_gpu
    state = training_memory_bytes(n, 4, 4, 8) if cpu else training_memory_bytes(n)
    share = cfg.num_workers if cfg.strategy == "fsdp" and cfg.num_workers > 1 else 1
    acts = activation_bytes(cfg.model, cfg.batch_size) * (2 if cpu else 1)
    return {"states": state["total"] / share, "activations": acts, "total": state["total"] / share + acts}


def check_memory(cfg: PretrainConfig) -> dict[str, float] | None:
    """Stop before training when the workers this machine would host need more memory than it has: on CPU all
    `num_workers` share the machine's available RAM; on GPU each worker needs its own device's memory. Returns the
    estimate, or None when it is not checked (switched off, a Ray cluster, or GPU workers with no GPU here)."""
    import os

    if not cfg.memory_check or os.environ.get("RAY_ADDRESS"):
        return None
    need = worker_memory_bytes(cfg)
    if cfg.use_gpu:
        import torch

        if not torch.cuda.is_available():
            return None
        have, where, total = torch.cuda.get_device_properties(0).total_memory, "GPU 0", need["total"]
    else:
        import psutil

        have, where, total = psutil.virtual_memory().available, "this machine's available RAM", need["total"] * cfg.num_workers
    if total > have:
        gb = 1e9
        raise GptflowError(
            f"pretraining needs about {total / gb:,.1f} GB but {where} has {have / gb:,.1f} GB: per worker "
            f"{need['states'] / gb:,.1f} GB of weights, gradients and AdamW states + {need['activations'] / gb:,.1f} "
            f"GB of activations for a micro-batch of {cfg.batch_size} x {cfg.model.block_size} tokens"
            + ("" if cfg.use_gpu else f", x {cfg.num_workers} workers")
            + "; lower pretrain.batch_size (raise grad_accum), shrink the model, use strategy=fsdp, or set "
            "pretrain.memory_check=false"
        )
    return need


def check_compiler(cfg: TrainOptions) -> None:
    """`compile` on CPU: torch's inductor builds C++ kernels on the workers, so a C++ compiler must be there.
    Checked here, before Ray starts, rather than as a compiler error from inside the first training step."""
    cxx = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")  # inductor's own default
    if cfg.compile and not cfg.use_gpu and not shutil.which(cxx):
        raise GptflowError(
            f"pretrain.compile=true on CPU needs a C++ compiler (torch.compile builds C++ kernels) and {cxx!r} was not "
            "found on PATH: install g++ (Debian: apt install g++), point CXX at one, or set pretrain.compile=false "
            "(`--set compile=false` with `gptflow pretrain`)"
        )


# ---------------------------------------------------------------- the driver


def fit_on_workers(loop: Any, loop_config: dict[str, Any], cfg: Any, name: str, out_dir: Path):
    """One Ray Train fit of `loop` on `cfg.num_workers` workers, the pattern of every training stage.

    Same name and storage path on every call: Ray V2 finds its checkpoint snapshot there and hands the latest
    checkpoint to get_checkpoint(), so a rerun of a killed (or failed) run resumes. Within a fit, a worker that
    dies is survived `cfg.max_failures` times: Ray Train restarts the whole worker group, which restores the same
    latest checkpoint through the same path (`setup_worker`), so the run goes on exactly as it would have.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from infra.ray_cluster import torch_trainer

    trainer = torch_trainer(
        functools.partial(clocked_loop, loop),
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str((out_dir / "ray").resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    return trainer.fit()


def clocked_loop(loop: Callable[[dict[str, Any]], None], config: dict[str, Any]) -> None:
    """`loop(config)` on a worker; rank 0 marks the wall time its loop starts and ends on the driver's progress
    queue, so that the driver can split the fit into its start-up, the loop and its end."""
    import ray.train

    from infra.progress import report_clock

    rank0 = ray.train.get_context().get_world_rank() == 0
    if rank0:
        report_clock(config.get("progress"), "loop_start")
    loop(config)
    if rank0:
        report_clock(config.get("progress"), "loop_end")


@dataclass(frozen=True)
class FitClock:
    """A fit's seconds, and of them Ray Train's start-up (from `fit()` to rank 0's loop starting: the controller
    and worker processes, their imports, the process group; with a restarted worker group, up to the first
    start) and its end (from the loop's last return to `fit()` returning)."""

    seconds: float
    startup_s: float
    end_s: float

    NAMES = ("fit_seconds", "fit_startup_seconds", "fit_end_seconds")  # the metrics, under the stage's scope

    def metrics(self, stage: str) -> dict[str, float]:
        return {f"{stage}/{name}": v for name, v in zip(self.NAMES, (self.seconds, self.startup_s, self.end_s),
                                                         strict=True)}


def fit_and_export(loop: Any, loop_config: dict[str, Any], cfg: Any, name: str, out_dir: Path,
                   progress_file: IO[str] | None, export: Callable[[Path], Any]) -> tuple[Any, dict[str, Any], FitClock]:
    """The driver side of every training stage: one Ray session and the progress bar around `fit_on_workers`, then
    `export(checkpoint_dir)` on the fit's last checkpoint. Returns what `export` returned, the last metrics the
    workers reported and the fit's clock; a worker's error is raised here."""
    from infra.progress import ray_progress
    from infra.ray_cluster import ray_session

    marks: dict[str, list[float]] = {}
    with ray_session():
        with ray_progress(cfg.steps, name, progress_file, marks) as progress:
            start = time.time()  # wall time, as the workers' marks are
            result = fit_on_workers(loop, {**loop_config, "progress": progress}, cfg, name, out_dir)
            end = time.time()
    if result.error:
        raise result.error
    # a mark lost (its queue gone) costs the split, never the finished fit
    starts, ends = marks.get("loop_start"), marks.get("loop_end")
    clock = FitClock(end - start, starts[0] - start if starts else math.nan, end - ends[-1] if ends else math.nan)
    with result.checkpoint.as_directory() as d:
        exported = export(Path(d))
    return exported, result.metrics or {}, clock


def export_checkpoint(checkpoint: Path, out_dir: Path) -> dict[str, list]:
    """The model and the history of a stage's last checkpoint into its folder (`model/`, `history.json`); returns
    the history."""
    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(checkpoint / name, model_dir / name)
    history = json.loads((checkpoint / "train_state.json").read_text())["history"]
    (out_dir / "history.json").write_text(json.dumps(history))
    return history


def pretrain_gpt(cfg: PretrainConfig, shards: ShardsRef, out_dir: Path, run: RunLink | None = None,
                 progress_file: IO[str] | None = None) -> ModelRef:
    """Run the Ray Train job; copy the final model out of the last checkpoint; plot the loss curve.

    Args:
        cfg: the stage's config.
        shards: the tokenizer stage's shards; their vocabulary must fit `cfg.model.vocab_size`.
        out_dir: the stage folder: `model/`, `history.json`, `loss_curve.png` and Ray's checkpoints in `ray/`.
        run: the MLflow run rank 0 logs its per-step metrics to; None logs nothing.
        progress_file: where the progress bar of the steps is drawn (None: stderr, when it is a terminal).

    Returns:
        The model folder, with the run's counts and final metrics.
    """
    from tasks.train_worker import train_loop_per_worker

    index = shards.index()
    vocab = index["vocab_size"]
    if vocab > cfg.model.vocab_size:
        raise GptflowError(f"pretrain.model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab}")
    check_data_budget(cfg, index["splits"]["train"]["tokens"], f"the shards in {shards.path}")
    check_memory(cfg)
    check_compiler(cfg)
    config = {"cfg": cfg.model_dump(mode="json"), "shards": str(Path(shards.path).resolve()),
              "run": (run or RunLink()).model_dump()}
    history, final, fit = fit_and_export(train_loop_per_worker, config, cfg, "pretrain", out_dir, progress_file,
                                             lambda d: export_checkpoint(d, out_dir))
    plot_loss(history, out_dir / "loss_curve.png", "pretraining")
    ref = _model_ref(cfg, out_dir, history, final, fit)
    if cfg.heldout_bpb:
        from models.checkpoint import load_model
        from tasks.heldout import split_bits_per_byte

        model, T = load_model(out_dir / "model"), cfg.model.block_size
        stride = cfg.heldout_stride or T
        scores = {"pretrain/heldout_bpb": split_bits_per_byte(model, Path(shards.path), stride=stride)}
        if stride < T:
            scores["pretrain/heldout_bpb_disjoint"] = split_bits_per_byte(model, Path(shards.path))
        ref = ref.model_copy(update={"metrics": {**ref.metrics, **scores}})
        print(f"pretrain: bits per byte on the whole validation split ({index['splits']['val']['bytes']:,} bytes, "
              f"each predicted once, windows of {T} every {stride}): "
              + ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in scores.items()))
    return ref


def _model_ref(cfg: PretrainConfig, out_dir: Path, history: dict[str, list], final: dict[str, Any],
               fit: FitClock) -> ModelRef:
    """Counts, and the final metrics: losses from the history, speed from the last report to Ray."""
    model_dir = out_dir / "model"
    planned = {"reason": "steps", "step": cfg.steps, "tokens": cfg.steps * cfg.tokens_per_step, "elapsed_s": math.nan}
    stop = history.get("stop", planned)  # why the run ended: its steps or its time budget, with what it managed
    metrics = {"pretrain/final_train_loss": history["train"][-1][1], "pretrain/final_val_loss": history["val"][-1][1],
               "pretrain/val_bpb": final.get("val_bpb", math.nan),
               "pretrain/tokens_per_s": final.get("perf_tokens_per_s", math.nan),
               "pretrain/mfu": final.get("perf_mfu", math.nan), **fit.metrics("pretrain"),
               "pretrain/tokens": stop["tokens"], "pretrain/train_seconds": stop["elapsed_s"],
               "pretrain/stopped_by_time_budget": float(stop["reason"] == "time_budget"),
               "pretrain/bf16_autocast": float(stop.get("bf16", cfg.use_gpu))}
    files = {"model": model_dir, "loss_curve": out_dir / "loss_curve.png", "history": out_dir / "history.json",
             "config": model_dir / "config.json"}
    return ModelRef(path=str(model_dir), counts={"steps": stop["step"], "tokens": stop["tokens"]},
                    metrics=metrics, files={k: str(v) for k, v in files.items()},
                    artifacts=["loss_curve", "history", "config"])
