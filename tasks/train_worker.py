"""The loop each Ray Train worker runs: set up (or restore) its rank's model, then step, log, evaluate and
checkpoint until the last step. Shared by pretraining (`train_loop_per_worker`) and SFT (`tasks/sft_worker.py`):
a stage gives `setup_worker` how its initial weights are made and `run_loop` where its batches come from.

Exact resume: a checkpoint holds the whole weights, the AdamW state, each rank's torch RNG and the step, and
the data windows of a step are a function of (seed, step, rank), so a resumed run draws what the killed one
would have drawn. Only rank 0 logs metrics and moves the driver's progress bar; every rank takes part in the
collectives (the loss mean, evaluation, the FSDP state gather). Ray is imported inside the functions that use
it: `bench.gpu` runs `train_step` on machines without Ray.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from infra.progress import report_progress
from models.config import GPTConfig
from models.optim import MuonAdamW
from models.plan import peak_bf16_flops
from tasks import train_state
from tasks.pretrain import PretrainConfig
from tasks.refs import RunLink
from tasks.stage import GptflowError
from tasks.train_config import lr_at, lr_at_time

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- data


class TokenWindows:
    """Random windows of `block_size + 1` tokens from memory-mapped shards; nothing is loaded whole."""

    def __init__(self, shards_dir: Path, split: str, block_size: int):
        index = json.loads((Path(shards_dir) / "index.json").read_text())
        dtype = np.dtype(index["dtype"])
        shards = index["splits"][split]["shards"]
        self.arrays = [np.memmap(Path(shards_dir) / s["file"], dtype=dtype, mode="r") for s in shards]
        self.arrays = [a for a in self.arrays if len(a) > 1]
        if not self.arrays:
            raise GptflowError(f"no {split} tokens in {shards_dir}")
        sizes = np.array([len(a) for a in self.arrays], dtype=np.float64)
        self.p = sizes / sizes.sum()
        self.T = block_size
        self.tokens_per_byte = index["splits"][split]["tokens"] / max(index["splits"][split]["bytes"], 1)

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for shard in rng.choice(len(self.arrays), size=batch_size, p=self.p):
            a = self.arrays[shard]
            start = int(rng.integers(0, max(len(a) - self.T - 1, 0) + 1))
            idx = (start + np.arange(self.T + 1)) % len(a)  # wraps only when a shard is shorter than a window
            rows.append(np.asarray(a[idx], dtype=np.int64))
        xy = torch.from_numpy(np.stack(rows))
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


# ---------------------------------------------------------------- data parallelism: DDP or FSDP2


def _rank_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    """Mean of a scalar tensor over the data-parallel ranks (gloo has no AVG, so SUM / world); no host sync."""
    if world == 1:
        return value
    value = value.detach().clone()
    torch.distributed.all_reduce(value)
    return value / world


@contextmanager
def _grad_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Gradients all-reduced in this backward (sync) or kept local for accumulation: DDP `no_sync`, FSDP2
    `set_requires_gradient_sync(False)` (its reduce-scatter waits for the next synced backward)."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def _distribute(raw: torch.nn.Module, fsdp: bool, world: int) -> torch.nn.Module:
    """DDP (Ray's `prepare_model`) or FSDP2: each block, then the rest (embeddings, head), sharded over ranks."""
    import ray.train.torch

    if world == 1:
        return raw
    if not fsdp:
        return ray.train.torch.prepare_model(raw)
    from torch.distributed.fsdp import fully_shard

    for block in raw.blocks:
        fully_shard(block)
    fully_shard(raw)
    return raw


def _full_state(raw: torch.nn.Module, opt: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Whole (unsharded) model and optimizer state dicts, on the CPU under FSDP; a collective call there."""
    if not fsdp:
        return raw.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(raw, options=full), get_optimizer_state_dict(raw, opt, options=full)


# ---------------------------------------------------------------- setup and restore


@dataclass
class Worker:
    """One Ray Train worker's share of the run."""

    cfg: Any  # the stage's config (PretrainConfig, SFTConfig): seed, lr, steps, batch_size, strategy, ...
    rank: int
    world: int
    device: torch.device
    raw: torch.nn.Module  # the GPT itself: optimizer groups, state dicts, FLOPs per token
    model: torch.nn.Module  # what runs forward and backward: DDP- or FSDP-wrapped, compiled when asked
    opt: torch.optim.Optimizer
    amp: Any  # bf16 autocast on GPU, on CPU with cfg.cpu_bf16 (`cpu_bf16`), else a null context
    accum: int  # micro-batches per optimizer step on this worker
    save_config: GPTConfig  # the architecture written beside the weights in every checkpoint
    stage: str = "pretrain"  # names the log lines
    start_step: int = 0
    elapsed_s: float = 0.0  # training seconds before start_step (a time budget's clock, continued on resume)
    history: dict[str, list] = field(default_factory=lambda: {"train": [], "val": [], "resumes": []})

    @property
    def fsdp(self) -> bool:
        return self.cfg.strategy == "fsdp" and self.world > 1


def setup_worker(cfg: Any, stage: str = "pretrain",
                 make_model: Callable[[torch.device], torch.nn.Module] | None = None,
                 save_config: GPTConfig | None = None, accum: int | None = None) -> Worker:
    """This rank's model and optimizer, restored from Ray Train's latest checkpoint when there is one.

    Args:
        cfg: the stage's config.
        stage: the stage's name in log lines.
        make_model: the initial model on the device (seeded the same on every rank); default a fresh
            `GPT(cfg.model)`. SFT loads the base model's weights here (and is where adapters would wrap it):
            whatever it returns is what gets restored, distributed and optimized.
        save_config: the architecture saved with each checkpoint; default `cfg.model`.
        accum: micro-batches per optimizer step; default `cfg.accum_steps`.
    """
    import ray.train
    import ray.train.torch

    from models.checkpoint import load_weights
    from models.gpt import GPT

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw = make_model(device) if make_model is not None else GPT(cfg.model).to(device)
    torch.manual_seed(cfg.seed + 1000 * (rank + 1))  # dropout: a different stream per rank
    fsdp = cfg.strategy == "fsdp" and world > 1
    ckpt = ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt is not None else nullcontext() as d:
        d = train_state.usable_checkpoint(Path(d), world) if d is not None else None  # skips a half-written one
        if d is not None:
            load_weights(raw, d)  # whole weights (and adapters), before any sharding
        model = _distribute(raw, fsdp, world)
        bf16 = device.type == "cuda" or cpu_bf16(cfg.cpu_bf16)
        opt = raw.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.optimizer,  # FSDP: shards
                                      cfg.embed_lr_mult, torch.bfloat16 if bf16 else None)
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        w = Worker(cfg, rank, world, device, raw, model, opt, amp, accum or cfg.accum_steps,
                   save_config or cfg.model, stage)
        if d is not None:
            _restore(w, d)
    if cfg.compile:
        w.model = torch.compile(w.model)
    return w


def cpu_bf16(mode: str) -> bool:
    """Whether a CPU worker trains under bf16 autocast (`TrainOptions.cpu_bf16`): on, or auto on a CPU with AMX
    tiles."""
    return mode == "on" or (mode == "auto" and torch.cpu._is_amx_tile_supported())


def _restore(w: Worker, d: Path) -> None:
    """AdamW moments and step, this rank's torch RNG, and the step and history (the step fixes the data)."""
    meta = train_state.read_json(d / "train_state.json")
    opt_state = train_state.load_optimizer_state(d / "optimizer.safetensors", meta["optimizer"])
    if w.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(w.raw, w.opt, opt_state, options=StateDictOptions(full_state_dict=True))
    else:
        w.opt.load_state_dict(opt_state)
    train_state.load_rng(d / f"rng_rank{w.rank}.safetensors")
    w.start_step, w.history = meta["step"], meta["history"]
    w.elapsed_s = meta.get("elapsed_s", 0.0)  # checkpoints from before time budgets have none
    w.history.setdefault("resumes", []).append(w.start_step)
    if w.rank == 0:
        log.info("[%s] resumed from checkpoint at step %d", w.stage, w.start_step)


# ---------------------------------------------------------------- one step


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, ...]],
               n_micro: int, grad_clip: float, device: torch.device, amp: Any,
               distributed: bool, loss_fn: LossFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `n_micro` micro-batches; returns (mean loss, gradient norm before clipping) as
    tensors on the device, so the host does not wait for the GPU: it samples and queues the next step meanwhile.

    A micro-batch is (x, y), whose mean loss counts 1/n_micro, or (x, y, scale), whose mean loss is multiplied
    by `scale` (SFT weighs each by its share of the step's assistant tokens). Gradients are all-reduced on the
    last micro-batch only (DDP `no_sync`, FSDP `set_requires_gradient_sync`). `loss_fn(model, micro)`, when
    given, is the micro-batch's share of the step's loss instead (the alignment stages: pairs, rollouts).
    """
    to_device = (lambda t: t.pin_memory().to(device, non_blocking=True)) if device.type == "cuda" else (lambda t: t)
    loss_sum = torch.zeros((), device=device)
    for micro, batch in enumerate(batches):
        sync = not distributed or micro == n_micro - 1
        with _grad_sync(model, sync), amp:
            if loss_fn is not None:
                loss = loss_fn(model, batch)
            else:
                x, y, *scale = batch
                loss = model(to_device(x), to_device(y))[1]
                loss = loss * scale[0] if scale else loss / n_micro
            loss.backward()
        loss_sum += loss.detach()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    if hasattr(gnorm, "full_tensor"):  # FSDP: a DTensor norm
        gnorm = gnorm.full_tensor()
    return loss_sum, gnorm


LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


class Batches(Protocol):
    """Where a stage's batches come from: a step's micro-batches on this rank, and the validation metrics.

    Optional, for stages whose loss is not the language-model loss of (x, y): `loss(model, micro)`, the
    micro-batch's share of the step's loss (see `train_step`), and `step_metrics(w)`, the stage's own metrics
    since the last log step (reward, KL, margins), merged into what is logged; a collective call when it
    averages over ranks.
    """

    def micro_batches(self, w: Worker, step: int) -> Iterable[Any]: ...

    def evaluate(self, w: Worker) -> dict[str, float]: ...  # holds "val/loss"; a collective call


class PretrainBatches:
    """Pretraining's batches: random windows of the token shards, a function of (seed, step, rank)."""

    def __init__(self, shards: Path, block_size: int):
        self.train = TokenWindows(shards, "train", block_size)
        self.val = TokenWindows(shards, "val", block_size)

    def micro_batches(self, w: Worker, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([w.cfg.seed, step, w.rank])  # data position = (seed, step, rank): exact on resume
        return (self.train.sample(rng, w.cfg.batch_size) for _ in range(w.accum))

    def evaluate(self, w: Worker) -> dict[str, float]:
        vloss = evaluate(w, self.val)
        return {"val/loss": vloss, "val/bpb": vloss / math.log(2) * self.val.tokens_per_byte}


def set_lr(opt: torch.optim.Optimizer | MuonAdamW, lr: float) -> None:
    """The scheduled learning rate on every group, times the group's "lr_mult" where it has one."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def _worker_step(w: Worker, data: Batches, step: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step` (from 0) of this rank: its learning rate, its micro-batches, one optimizer step."""
    set_lr(w.opt, lr)
    batches = data.micro_batches(w, step)
    return train_step(w.model, w.opt, batches, w.accum, w.cfg.grad_clip, w.device, w.amp, w.world > 1,
                      getattr(data, "loss", None))


def evaluate(w: Worker, val: TokenWindows) -> float:
    """Validation loss, the mean over ranks (a collective call); the same windows at every evaluation."""
    w.model.eval()
    rng = np.random.default_rng([w.cfg.seed, 7777, w.rank])
    losses = []
    with torch.no_grad(), w.amp:
        for _ in range(w.cfg.eval_batches):
            x, y = val.sample(rng, w.cfg.batch_size)
            losses.append(w.model(x.to(w.device), y.to(w.device))[1].item())
    w.model.train()
    return _rank_mean(torch.tensor(float(np.mean(losses)), device=w.device), w.world).item()


# ---------------------------------------------------------------- metrics, progress and throughput


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.5) -> float:
    """Measured dense matmul throughput (FLOP/s) on this device: the denominator of MFU on CPU."""
    g = torch.Generator(device=device).manual_seed(0)  # its own generator: the training RNG stream stays untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start)


class Meter:
    """Tokens/s and MFU since the last log step, the metrics to MLflow, the log line and the driver's progress
    bar. Only rank 0 logs, measures and draws; the other ranks' logger is a `NullLogger`.

    MFU is per worker: each worker's model FLOP/s over the matmul throughput of one worker's CPUs (or GPU), in
    the dtype the matmuls run in (bf16 under autocast), re-measured briefly at every log step and the best kept,
    so a busy moment at start-up does not inflate it.
    On a GPU in the datasheet table, `perf/mfu_datasheet` divides by its bf16 peak instead, as papers report it.
    """

    def __init__(self, w: Worker, run: RunLink, progress: Any):
        cfg = w.cfg
        self.w, self.logger, self.progress = w, run.logger(w.rank), progress
        cuda, self.bf16 = w.device.type == "cuda", isinstance(w.amp, torch.autocast)
        # the peak of the dtype the matmuls run in
        self.peak_args = (torch.bfloat16, 4096 if cuda else 1024) if self.bf16 else (torch.float32, 1024)
        self.peak = matmul_flops(w.device, *self.peak_args) if w.rank == 0 else math.nan
        self.datasheet = peak_bf16_flops(torch.cuda.get_device_name(w.device)) if w.device.type == "cuda" else None
        self.flops_per_token = w.raw.flops_per_token()
        block_size = w.raw.config.block_size
        self.tokens_per_step = w.world * cfg.batch_size * w.accum * block_size
        self.progress_every = max(1, cfg.steps // 200)  # the driver's progress bar: ~200 updates in a run
        if w.rank == 0:
            log.info("[%s] %d workers x %d micro-batches of %d x %d tokens = %s tokens per step, %s", w.stage,
                     w.world, w.accum, cfg.batch_size, block_size, f"{self.tokens_per_step:,}",
                     "bf16 autocast" if self.bf16 else "fp32")
        self.restart_clock(w.start_step)

    def restart_clock(self, step: int) -> None:
        """Tokens/s counts from here: evaluation and checkpoints stay out of it."""
        self.t_last, self.step_last = time.perf_counter(), step

    def progress_bar(self, step: int, loss: float | None) -> None:
        """Move the driver's bar every `progress_every` steps, and at log steps with the loss."""
        if self.w.rank == 0 and (step % self.progress_every == 0 or loss is not None):
            report_progress(self.progress, step, **({"loss": loss} if loss is not None else {}))

    def train_metrics(self, step: int, lr: float, loss: float, gnorm: torch.Tensor) -> dict[str, float]:
        gnorm_value = gnorm.item()
        tps = self.tokens_per_step * (step - self.step_last) / (time.perf_counter() - self.t_last)
        if self.w.rank == 0:
            self.peak = max(self.peak, matmul_flops(self.w.device, *self.peak_args, seconds=0.1))
        worker_flops = tps / self.w.world * self.flops_per_token
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": gnorm_value, "perf/tokens_per_s": tps,
                   "perf/mfu": worker_flops / self.peak}
        if self.datasheet:
            metrics["perf/mfu_datasheet"] = worker_flops / self.datasheet
        return metrics

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not metrics:
            return
        self.logger.log(metrics, step)
        if self.w.rank == 0:
            # logging, not print: Ray Train V2 patches print() in workers to echo to stdout *and* to the
            # root logger, and both are forwarded to the driver, so every printed line showed twice.
            shown = " ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items())
            steps = self.w.cfg.steps
            log.info("[%s] step %d/%d (%.0f%%) %s", self.w.stage, step, steps, 100 * step / steps, shown)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(w: Worker, step: int, loss: float, metrics: dict[str, float]) -> None:
    """Report the step's metrics to Ray Train with a checkpoint: whole weights, AdamW state and history (rank 0)
    and each rank's RNG; Ray merges the ranks' files into one checkpoint folder."""
    import ray.train

    from models.checkpoint import save_state_dict

    report = {"step": step, "train_loss": loss, **{k.replace("/", "_"): v for k, v in metrics.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        train_state.save_rng(d / f"rng_rank{w.rank}.safetensors")
        model_sd, opt_sd = _full_state(w.raw, w.opt, w.fsdp)  # FSDP: gathered on every rank, kept by rank 0
        if w.rank == 0:
            save_state_dict(model_sd, w.save_config, d)
            meta = {"step": step, "elapsed_s": w.elapsed_s, "history": w.history,
                    "optimizer": train_state.save_optimizer_state(opt_sd, d / "optimizer.safetensors")}
            meta["files"] = train_state.file_sizes(d)  # what a whole copy of this checkpoint holds
            train_state.write_json(d / train_state.STATE_FILE, meta)  # written last: the completion marker
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")


# ---------------------------------------------------------------- the loop


def _flush(pending: list[tuple[int, torch.Tensor]], history: dict[str, list]) -> float:
    """Copy the steps' losses to the host (one sync per log step) into the history; returns the latest."""
    history["train"] += [[s, v.item()] for s, v in pending]
    pending.clear()
    return history["train"][-1][1]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's function on every pretraining worker. `config`: {"cfg": the PretrainConfig as JSON,
    "shards": the shards folder, "run": a `RunLink` as a dict, "progress": the driver's progress queue}."""
    cfg = PretrainConfig.model_validate(config["cfg"])
    w = setup_worker(cfg)
    data = PretrainBatches(Path(config["shards"]), cfg.model.block_size)
    run_loop(w, data, RunLink.model_validate(config.get("run") or {}), config.get("progress"))


def _shared_clock(w: Worker, elapsed_s: float) -> float:
    """Rank 0's clock on every rank (a collective call): the ranks must agree on the learning rate and on the
    step a time budget stops at, or their weights and collectives would part."""
    if w.world == 1:
        return elapsed_s
    t = torch.tensor(elapsed_s, dtype=torch.float64, device=w.device)
    torch.distributed.broadcast(t, src=0)
    return t.item()


def run_loop(w: Worker, data: Batches, run: RunLink, progress: Any, eval_first: bool = False) -> None:
    """Step from `w.start_step` to `w.cfg.steps`: learning rate `lr_at`, log every `log_every`, evaluate every
    `eval_every`, checkpoint every `ckpt_every` (each also at the last step). `eval_first`: a validation loss at
    step 0 too (fine-tuning's "before"); not repeated on resume.

    With `cfg.time_budget_s` (pretraining), the clock drives the run: the learning rate is `lr_at_time` of the
    training seconds so far (rank 0's, continued from the checkpoint on resume; logging, evaluation and
    checkpoints do not count), and the step that ends past the budget is the last. The history records why the
    run stopped, its steps, tokens and seconds."""
    cfg = w.cfg
    budget = getattr(cfg, "time_budget_s", None)
    meter = Meter(w, run, progress)
    if eval_first and w.start_step == 0:
        w.history["val"].append([0, data.evaluate(w)["val/loss"]])
        meter.restart_clock(0)
    if budget is not None and w.elapsed_s >= budget:
        return  # a finished run started again: its last checkpoint is the result
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet copied to the host
    loss = math.nan
    t0 = time.perf_counter()
    for step in range(w.start_step, cfg.steps):
        lr = lr_at(step, cfg) if budget is None else lr_at_time(w.elapsed_s, budget, cfg)
        loss_t, gnorm_t = _worker_step(w, data, step, lr)
        pending.append((step + 1, _rank_mean(loss_t, w.world)))  # the global batch's loss, not rank 0's share
        w.elapsed_s += time.perf_counter() - t0
        if budget is not None:  # a host sync each step, so the clock sees the step's work done
            w.elapsed_s = _shared_clock(w, w.elapsed_s)
        out_of_time = budget is not None and w.elapsed_s >= budget
        done, last = step + 1, step + 1 == cfg.steps or out_of_time
        log_due, ckpt_due = done % cfg.log_every == 0 or last, done % cfg.ckpt_every == 0 or last
        if log_due or ckpt_due:
            loss = _flush(pending, w.history)
        meter.progress_bar(done, loss if log_due else None)
        metrics = meter.train_metrics(done, lr, loss, gnorm_t) if log_due else {}
        if log_due:
            metrics.update({"train/tokens": done * meter.tokens_per_step, "train/elapsed_s": w.elapsed_s})
        if log_due and hasattr(data, "step_metrics"):
            metrics.update(data.step_metrics(w))
        if done % cfg.eval_every == 0 or last:
            metrics.update(data.evaluate(w))
            w.history["val"].append([done, metrics["val/loss"]])
        meter.log(metrics, done)
        if last:
            w.history["stop"] = {"reason": "time_budget" if out_of_time else "steps", "step": done,
                                 "tokens": done * meter.tokens_per_step, "elapsed_s": w.elapsed_s,
                                 "bf16": meter.bf16}
        if ckpt_due:
            save_checkpoint(w, done, loss, metrics)
        if log_due:
            meter.restart_clock(done)
        t0 = time.perf_counter()  # logging (its MFU probe: 0.1 s), evaluation, checkpoints: off the clock
        if last:
            break
