"""Pretraining stage: a GPT trained on the token shards with Ray Train (DDP or FSDP over workers), resumable.

In: `shards/` from the tokenizer stage. Out: `model/` (`model.safetensors`, `config.json`), the loss curve
(`loss_curve.png`, `history.json`) and Ray Train checkpoints under `ray/`. A run that is killed resumes
from its latest checkpoint when it is started again with the same inputs and parameters (same stage folder,
same Ray `RunConfig(name, storage_path)`), and the resumed loss curve equals the uninterrupted one: checkpoints
hold the weights, the AdamW state, each rank's torch RNG and the step, and the data windows are a function of
(seed, step, rank). Run alone: `gptflow pretrain --input SHARDS_DIR`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from tasks.configs import PretrainConfig
from tasks.stage import GptflowError

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


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = int(cfg.steps * 0.8)
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(cfg.steps - decay_start, 1)
        return cfg.lr - (cfg.lr - floor) * frac
    frac = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(frac, 1.0)))


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


# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s, without sparsity), by device name.
DATASHEET_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


def datasheet_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in DATASHEET_BF16.items() if key in name), None)


# ---------------------------------------------------------------- the loop on each Ray worker


class _NullTracker:
    """Ranks above 0 (and runs without a run id) log nothing, and never import mlflow."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass


def _rank_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    """Mean of a scalar tensor over the data-parallel ranks (gloo has no AVG, so SUM / world); no host sync."""
    if world == 1:
        return value
    value = value.detach().clone()
    torch.distributed.all_reduce(value)
    return value / world


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               n_micro: int, grad_clip: float, device: torch.device, amp: Any, distributed: bool) -> tuple[float, float]:
    """One optimizer step over `n_micro` micro-batches; returns (mean loss, gradient norm before clipping) as
    tensors on the device, so the host does not wait for the GPU: it samples and queues the next step meanwhile.

    Gradients are all-reduced on the last micro-batch only (DDP `no_sync`, FSDP `set_requires_gradient_sync`).
    """
    to_device = (lambda t: t.pin_memory().to(device, non_blocking=True)) if device.type == "cuda" else (lambda t: t)
    loss_sum = torch.zeros((), device=device)
    for micro, (x, y) in enumerate(batches):
        sync = not distributed or micro == n_micro - 1
        with _grad_sync(model, sync), amp:
            loss = model(to_device(x), to_device(y))[1] / n_micro
            loss.backward()
        loss_sum += loss.detach()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    if hasattr(gnorm, "full_tensor"):  # FSDP: a DTensor norm
        gnorm = gnorm.full_tensor()
    return loss_sum, gnorm


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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from infra.progress import report_progress
    from models.checkpoint import load_model, save_state_dict
    from models.gpt import GPT
    from tasks import train_state

    cfg = PretrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw = GPT(cfg.model).to(device)
    torch.manual_seed(cfg.seed + 1000 * (rank + 1))  # dropout: a different stream per rank
    start_step, history = 0, {"train": [], "val": [], "resumes": []}
    fsdp = cfg.strategy == "fsdp" and world > 1

    # Exact resume: weights, AdamW moments and step, each rank's torch RNG, and the step (which fixes the data).
    ckpt = ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt is not None else nullcontext() as d:
        if d is not None:
            raw.load_state_dict(load_model(Path(d), device).state_dict())  # whole weights, before any sharding
        model = _distribute(raw, fsdp, world)
        opt = raw.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))  # FSDP: over the shards
        if d is not None:
            meta = train_state.read_json(Path(d) / "train_state.json")
            opt_state = train_state.load_optimizer_state(Path(d) / "optimizer.safetensors", meta["optimizer"])
            if fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(raw, opt, opt_state, options=StateDictOptions(full_state_dict=True))
            else:
                opt.load_state_dict(opt_state)
            train_state.load_rng(Path(d) / f"rng_rank{rank}.safetensors")
            start_step, history = meta["step"], meta["history"]
            history.setdefault("resumes", []).append(start_step)
            if rank == 0:
                log.info("[pretrain] resumed from checkpoint at step %d", start_step)

    if cfg.compile:
        model = torch.compile(model)
    train = TokenWindows(Path(config["shards"]), "train", cfg.model.block_size)
    val = TokenWindows(Path(config["shards"]), "val", cfg.model.block_size)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if rank == 0 and config.get("run_id"):
        from tasks.tracking import MetricLogger

        tracker = MetricLogger(config["run_id"], config.get("tracking_uri"))
    else:
        tracker = _NullTracker()
    # MFU is per worker: each worker's model FLOP/s over the matmul throughput of one worker's CPUs (or GPU),
    # re-measured briefly at every log step and the best kept, so a busy moment at start-up does not inflate it.
    peak_dtype, peak_n = (torch.bfloat16, 4096) if device.type == "cuda" else (torch.float32, 1024)
    peak = matmul_flops(device, peak_dtype, peak_n) if rank == 0 else math.nan
    datasheet = datasheet_flops(device)  # the GPU's bf16 peak, for MFU as papers report it (None on CPU)
    flops_per_token = raw.flops_per_token()
    tokens_per_step = world * cfg.batch_size * cfg.accum_steps * cfg.model.block_size
    if rank == 0:
        log.info("[pretrain] %d workers x %d micro-batches of %d x %d tokens = %s tokens per step", world,
                 cfg.accum_steps, cfg.batch_size, cfg.model.block_size, f"{tokens_per_step:,}")

    def evaluate() -> float:
        model.eval()
        rng = np.random.default_rng([cfg.seed, 7777, rank])  # the same windows at every evaluation
        losses = []
        with torch.no_grad(), amp:
            for _ in range(cfg.eval_batches):
                x, y = val.sample(rng, cfg.batch_size)
                losses.append(model(x.to(device), y.to(device))[1].item())
        model.train()
        return _rank_mean(torch.tensor(float(np.mean(losses)), device=device), world).item()

    t_last, step_last = time.perf_counter(), start_step
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet copied to the host
    progress_every = max(1, cfg.steps // 200)  # the driver's progress bar: ~200 updates in a run
    for step in range(start_step, cfg.steps):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        rng = np.random.default_rng([cfg.seed, step, rank])  # data position = (seed, step, rank): exact on resume
        batches = (train.sample(rng, cfg.batch_size) for _ in range(cfg.accum_steps))
        loss_t, gnorm_t = train_step(model, opt, batches, cfg.accum_steps, cfg.grad_clip, device, amp, world > 1)
        pending.append((step + 1, _rank_mean(loss_t, world)))  # the whole global batch's loss, not rank 0's share
        last = step + 1 == cfg.steps
        metrics: dict[str, float] = {}
        metrics_due = (step + 1) % cfg.log_every == 0 or last
        if metrics_due or (step + 1) % cfg.ckpt_every == 0:  # one host sync per log step
            history["train"] += [[s, v.item()] for s, v in pending]
            pending.clear()
            loss_sum = history["train"][-1][1]
        if rank == 0 and ((step + 1) % progress_every == 0 or metrics_due):
            report_progress(config.get("progress"), step + 1, **({"loss": loss_sum} if metrics_due else {}))
        if (step + 1) % cfg.log_every == 0 or last:
            gnorm = gnorm_t.item()
            dt = time.perf_counter() - t_last
            tps = tokens_per_step * (step + 1 - step_last) / dt
            if rank == 0:
                peak = max(peak, matmul_flops(device, peak_dtype, peak_n, seconds=0.1))
            metrics = {"train/loss": loss_sum, "train/lr": lr, "train/grad_norm": gnorm, "perf/tokens_per_s": tps,
                       "perf/mfu": tps / world * flops_per_token / peak}
            if datasheet:
                metrics["perf/mfu_datasheet"] = tps / world * flops_per_token / datasheet
        if (step + 1) % cfg.eval_every == 0 or last:
            vloss = evaluate()
            metrics.update({"val/loss": vloss, "val/bpb": vloss / math.log(2) * val.tokens_per_byte})
            history["val"].append([step + 1, vloss])
        if metrics:
            tracker.log(metrics, step + 1)
            if rank == 0:
                # logging, not print: Ray Train V2 patches print() in workers to echo to stdout *and* to the
                # root logger, and both are forwarded to the driver, so every printed line showed twice.
                shown = " ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items())
                log.info("[pretrain] step %d/%d (%.0f%%) %s", step + 1, cfg.steps, 100 * (step + 1) / cfg.steps, shown)
        if (step + 1) % cfg.ckpt_every == 0 or last:
            report = {"step": step + 1, "train_loss": loss_sum, **{k.replace("/", "_"): v for k, v in metrics.items()}}
            # Every rank adds its own RNG file; Ray merges the ranks' files into one checkpoint folder.
            with tempfile.TemporaryDirectory() as tmp:
                d = Path(tmp)
                train_state.save_rng(d / f"rng_rank{rank}.safetensors")
                model_sd, opt_sd = _full_state(raw, opt, fsdp)  # FSDP: gathered on every rank, kept by rank 0
                if rank == 0:
                    save_state_dict(model_sd, cfg.model, d)
                    meta = {"step": step + 1, "history": history,
                            "optimizer": train_state.save_optimizer_state(opt_sd, d / "optimizer.safetensors")}
                    train_state.write_json(d / "train_state.json", meta)  # written last: the folder is complete
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"checkpoint_{step + 1:06d}")
        if (step + 1) % cfg.log_every == 0 or last:
            t_last, step_last = time.perf_counter(), step + 1  # evaluation and checkpoints stay out of tokens/s


# ---------------------------------------------------------------- the driver


def _fit(cfg: PretrainConfig, shards_dir: Path, out_dir: Path, run_id: str | None, tracking_uri: str | None,
         progress: Any = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "shards": str(Path(shards_dir).resolve()),
                           "run_id": run_id, "tracking_uri": tracking_uri, "progress": progress},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        # Same name and storage path on every call: Ray V2 finds its checkpoint snapshot there and hands the
        # latest checkpoint to get_checkpoint(), so a rerun of a killed (or failed) run resumes. No in-process
        # retries (max_failures=0): a failure surfaces; the stage rerun resumes from the last checkpoint.
        run_config=RunConfig(name="pretrain", storage_path=str((out_dir / "ray").resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=0)),
    )
    return trainer.fit()


def pretrain_gpt(cfg: PretrainConfig, shards_dir: Path, out_dir: Path, run_id: str | None = None,
                 tracking_uri: str | None = None, progress_file: IO[str] | None = None) -> dict[str, Any]:
    """Run the Ray Train job; copy the final model out of the last checkpoint; plot the loss curve.

    A progress bar follows the steps in the terminal (`progress_file`: where to draw it instead of stderr).
    """
    from infra.progress import ray_progress
    from infra.ray_cluster import ray_session

    index = json.loads((Path(shards_dir) / "index.json").read_text())
    if index["vocab_size"] > cfg.model.vocab_size:
        raise GptflowError(
            f"pretrain.model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {index['vocab_size']}"
        )
    start = time.perf_counter()
    with ray_session(), ray_progress(cfg.steps, "pretrain", progress_file) as progress:
        result = _fit(cfg, shards_dir, out_dir, run_id, tracking_uri, progress)
    seconds = time.perf_counter() - start
    if result.error:
        raise result.error
    model_dir = out_dir / "model"
    with result.checkpoint.as_directory() as d:
        model_dir.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "config.json"):
            shutil.copy(Path(d) / name, model_dir / name)
        history = json.loads((Path(d) / "train_state.json").read_text())["history"]
    (out_dir / "history.json").write_text(json.dumps(history))
    plot_loss(history, out_dir / "loss_curve.png", "pretraining")
    final = result.metrics or {}
    return {
        "counts": {"steps": cfg.steps, "tokens": cfg.steps * cfg.tokens_per_step},
        "metrics": {"pretrain/final_train_loss": history["train"][-1][1], "pretrain/final_val_loss": history["val"][-1][1],
                    "pretrain/val_bpb": final.get("val_bpb", float("nan")),
                    "pretrain/tokens_per_s": final.get("perf_tokens_per_s", float("nan")),
                    "pretrain/mfu": final.get("perf_mfu", float("nan")), "pretrain/fit_seconds": seconds},
        "outputs": {"model": model_dir, "loss_curve": out_dir / "loss_curve.png"},
    }


def plot_loss(history: dict[str, list], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for split, style in (("train", "-"), ("val", "o-")):
        if history.get(split):
            steps, losses = zip(*history[split], strict=True)
            ax.plot(steps, losses, style, label=split, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
