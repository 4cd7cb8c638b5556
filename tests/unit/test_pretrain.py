"""Pretraining stage: data windows, learning-rate schedules, exact optimizer/RNG state, and real Ray Train runs.

The Ray tests join the session's one local Ray (`ray_once`, tests/conftest.py) and run 2-worker fits on CPU: an uninterrupted reference run for
DDP and one for FSDP, a DDP run whose whole process tree is killed with SIGKILL after its second checkpoint and
the rerun that resumes it, an FSDP rerun from its reference's second-to-last checkpoint, and two short fits with
gradient accumulation checked against a one-process replica; about 3 minutes on 2 cores, most of it Ray Train's
start of each fit.

Run: `.venv/bin/python -m pytest tests/unit/test_pretrain.py -q`
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from killing import assert_no_line_repeats, assert_same_curves, kill_after_checkpoint

from models.gpt import GPT, GPTConfig
from tasks import train_state
from tasks.pretrain import PretrainConfig, pretrain_gpt
from tasks.refs import ModelRef, ShardsRef
from tasks.stage import GptflowError
from tasks.train_config import lr_at
from tasks.train_worker import TokenWindows

# 2 workers x 16 sequences x 64 tokens = 2,048 tokens per step; 30 steps, a checkpoint every 5. Ray takes in a
# worker's report only when it polls (every 0.2 s, infra.ray_cluster.POLL_S) and holds the next report until then,
# so a kill right after the second checkpoint is recorded lands seconds before the run's end. Dropout makes the
# resume depend on each rank's RNG.
CFG = PretrainConfig(
    model=GPTConfig(arch="llama", vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.1),
    steps=30, batch_size=16, lr=3e-3, warmup_steps=3, num_workers=2,
    log_every=5, eval_every=15, eval_batches=2, ckpt_every=5, keep_checkpoints=2,
)
CFG_FSDP = CFG.model_copy(update={"strategy": "fsdp"})


# ---------------------------------------------------------------- data windows (no Ray)


def _write_shards(root: Path, splits: dict[str, list[np.ndarray]]) -> Path:
    """A shards folder in the tokenizer stage's format, holding the given token arrays."""
    root.mkdir(parents=True, exist_ok=True)
    index = {"dtype": "uint16", "vocab_size": 4096, "eot_id": 0, "splits": {}}
    for split, arrays in splits.items():
        shards = []
        for i, a in enumerate(arrays):
            name = f"{split}_{i:04d}.bin"
            a.astype(np.uint16).tofile(root / name)
            shards.append({"file": name, "tokens": len(a), "docs": 1})
        tokens = sum(len(a) for a in arrays)
        index["splits"][split] = {"tokens": tokens, "docs": len(arrays), "bytes": 4 * tokens, "shards": shards}
    (root / "index.json").write_text(json.dumps(index))
    return root


@pytest.fixture
def counting_shards(tmp_path) -> Path:
    """Token i is the number i, so a window's content says where it came from."""
    return _write_shards(tmp_path / "shards", {"train": [np.arange(0, 1000), np.arange(1000, 1300)],
                                               "val": [np.arange(2000, 2100)]})


def test_windows_are_contiguous_and_targets_are_shifted(counting_shards):
    x, y = TokenWindows(counting_shards, "train", 16).sample(np.random.default_rng(0), 64)
    assert x.shape == y.shape == (64, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # next-token targets
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(64, 16))  # one contiguous run per row
    starts = x[:, 0]
    in_first = (starts >= 0) & (starts <= 1000 - 17)
    in_second = (starts >= 1000) & (starts <= 1300 - 17)
    assert bool((in_first | in_second).all())  # never across a shard boundary or past its end
    assert bool(in_first.any() and in_second.any())


def test_same_seed_same_batches_and_different_streams_differ(counting_shards):
    w = TokenWindows(counting_shards, "train", 16)

    def batch(seed: int, step: int, rank: int) -> torch.Tensor:
        return w.sample(np.random.default_rng([seed, step, rank]), 8)[0]

    assert torch.equal(batch(1337, 5, 0), batch(1337, 5, 0))
    assert torch.equal(TokenWindows(counting_shards, "train", 16).sample(np.random.default_rng([1337, 5, 0]), 8)[0],
                       batch(1337, 5, 0))  # a fresh reader (a resumed worker) sees the same windows
    for other in (batch(1338, 5, 0), batch(1337, 6, 0), batch(1337, 5, 1)):
        assert not torch.equal(other, batch(1337, 5, 0))


def test_windows_wrap_a_shard_shorter_than_a_window_and_reject_an_empty_split(tmp_path):
    shards = _write_shards(tmp_path / "short", {"train": [np.arange(10)], "val": [np.arange(1)]})
    x, y = TokenWindows(shards, "train", 16).sample(np.random.default_rng(0), 2)
    assert x.shape == (2, 16) and int(x.max()) < 10
    with pytest.raises(GptflowError, match="no val tokens"):
        TokenWindows(shards, "val", 16)  # a 1-token shard has no (input, target) pair


# ---------------------------------------------------------------- learning-rate schedules


def _lrs(**kw) -> list[float]:
    cfg = CFG.model_copy(update={"steps": 100, "warmup_steps": 10, "lr": 1e-3, "min_lr_ratio": 0.1, **kw})
    return [lr_at(s, cfg) for s in range(cfg.steps)]


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_warmup_is_linear_up_to_the_peak(schedule):
    lrs = _lrs(schedule=schedule)
    assert lrs[:10] == pytest.approx([1e-4 * (s + 1) for s in range(10)])
    assert max(lrs) == pytest.approx(1e-3)


def test_cosine_decays_monotonically_to_the_floor():
    lrs = _lrs(schedule="cosine")
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-9)  # half-way: the midpoint of peak and floor
    assert 1e-4 <= lrs[-1] < 1.01e-4


def test_wsd_is_flat_then_decays_linearly_over_the_last_fifth():
    lrs = _lrs(schedule="wsd")
    assert lrs[10:80] == pytest.approx([1e-3] * 70)
    decay = np.diff(lrs[80:])
    assert np.allclose(decay, decay[0]) and decay[0] < 0  # a straight line down
    assert lrs[-1] == pytest.approx(1e-4 + 9e-4 / 20)  # one step short of the floor


def test_wsd_decays_over_the_share_decay_frac_names():
    lrs = _lrs(schedule="wsd", decay_frac=0.5)
    assert lrs[10:50] == pytest.approx([1e-3] * 40)
    assert lrs[50] == pytest.approx(1e-3) and lrs[51] < 1e-3  # the decay starts half-way
    assert lrs[-1] == pytest.approx(1e-4 + 9e-4 / 50)


# ---------------------------------------------------------------- checkpoint state (no Ray)


def _step(model: GPT, opt: torch.optim.Optimizer, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (4, 17), generator=g)
    loss = model(x[:, :-1], x[:, 1:].contiguous())[1]  # GPT.loss views the targets: they must be contiguous
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def test_optimizer_and_rng_state_round_trip_exactly(tmp_path):
    from models.checkpoint import load_model, save_model

    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.1)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = model.configure_optimizer(1e-2, 0.1)
    for seed in range(3):
        _step(model, opt, seed)
    save_model(model, tmp_path)
    meta = train_state.save_optimizer(opt, tmp_path / "optimizer.safetensors")
    train_state.write_json(tmp_path / "meta.json", meta)  # through JSON, as in a checkpoint
    train_state.save_rng(tmp_path / "rng.safetensors")
    expected = [_step(model, opt, seed) for seed in (3, 4)]  # dropout draws from the global RNG

    torch.manual_seed(123)  # a different RNG state, restored below
    resumed = GPT(cfg)
    resumed.load_state_dict(load_model(tmp_path).state_dict())
    opt2 = resumed.configure_optimizer(1e-2, 0.1)
    train_state.load_optimizer(opt2, tmp_path / "optimizer.safetensors", train_state.read_json(tmp_path / "meta.json"))
    train_state.load_rng(tmp_path / "rng.safetensors")
    assert [_step(resumed, opt2, seed) for seed in (3, 4)] == expected
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- real Ray Train runs


@pytest.fixture(scope="module")
def reference(shards, ray_once, tmp_path_factory) -> tuple[Path, ModelRef]:
    """The uninterrupted run: 2 workers, 30 steps; its progress bar drawn into a file."""
    out = tmp_path_factory.mktemp("reference")
    with open(out / "progress.txt", "w") as bar:
        return out, pretrain_gpt(CFG, ShardsRef(path=str(shards)), out, progress_file=bar)


@pytest.fixture(scope="module")
def reference_fsdp(shards, ray_once, tmp_path_factory) -> tuple[Path, ModelRef]:
    """The same run with the model and AdamW states sharded over the 2 workers (FSDP2)."""
    out = tmp_path_factory.mktemp("reference_fsdp")
    return out, pretrain_gpt(CFG_FSDP, ShardsRef(path=str(shards)), out)


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_run_learns_and_exports_the_model(reference):
    from models.checkpoint import load_model

    out, result = reference
    history = json.loads((out / "history.json").read_text())
    train = [loss for _, loss in history["train"]]
    assert [s for s, _ in history["train"]] == list(range(1, CFG.steps + 1))
    assert train[0] == pytest.approx(math.log(512), abs=0.1)  # starts at chance
    assert train[-1] < train[0] - 0.5, train
    assert [s for s, _ in history["val"]] == [15, 30] and history["val"][1][1] < history["val"][0][1]
    assert history["resumes"] == []

    assert isinstance(result, ModelRef) and result.path == str(out / "model")
    assert result.counts == {"steps": 30, "tokens": 30 * 2 * 16 * 64}
    assert set(result.files) == {"model", "loss_curve", "history", "config"}
    assert set(result.artifacts) == {"loss_curve", "history", "config"}
    m = result.metrics
    assert m["pretrain/final_train_loss"] == train[-1]
    assert m["pretrain/tokens_per_s"] > 0 and m["pretrain/mfu"] > 0 and 0 < m["pretrain/val_bpb"] < 8  # MFU is noisy
    # the fit's clock: Ray Train's start-up before rank 0's loop, the loop (which holds the steps), the fit's end
    startup, end, fit = m["pretrain/fit_startup_seconds"], m["pretrain/fit_end_seconds"], m["pretrain/fit_seconds"]
    assert startup > 0 and end >= 0
    assert 0 < m["pretrain/train_seconds"] < fit - startup - end
    assert result.file("loss_curve").stat().st_size > 0
    model = load_model(Path(result.path))
    assert model.config == CFG.model
    bar = (out / "progress.txt").read_text()  # the driver's bar, fed by rank 0 through a Ray queue
    assert "pretrain: 100%" in bar and "30/30" in bar and "loss=" in bar, bar[-500:]


@pytest.mark.ray
@pytest.mark.slow
def test_fsdp_run_follows_the_ddp_run(reference, reference_fsdp):
    """Sharding changes where the state lives, not the arithmetic: the same loss curve as DDP (up to the order of
    floating-point sums in the collectives), and a whole, unsharded model in the usual safetensors files."""
    from models.checkpoint import load_model

    ddp = json.loads((reference[0] / "history.json").read_text())
    fsdp = json.loads((reference_fsdp[0] / "history.json").read_text())
    for split in ("train", "val"):
        assert [s for s, _ in fsdp[split]] == [s for s, _ in ddp[split]]
        np.testing.assert_allclose([v for _, v in fsdp[split]], [v for _, v in ddp[split]], rtol=0, atol=1e-4)
    a = load_model(Path(reference[1].path)).state_dict()
    b = load_model(Path(reference_fsdp[1].path)).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-3, msg=name)


def _one_process_replica(cfg: PretrainConfig, shards: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    """What `cfg`'s run must compute, in one process: every rank's micro-batches, each loss divided by the number
    of micro-batches in the global batch, summed into one gradient, then one AdamW step."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model.model_copy(update={"loss_chunk": 0}))
    opt = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    windows = TokenWindows(shards, "train", cfg.model.block_size)
    n_micro, losses = cfg.num_workers * cfg.accum_steps, []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        total = 0.0
        for rank in range(cfg.num_workers):
            rng = np.random.default_rng([cfg.seed, step, rank])  # the windows the worker of this rank draws
            for _ in range(cfg.accum_steps):
                loss = model(*windows.sample(rng, cfg.batch_size))[1] / n_micro
                loss.backward()
                total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, model.state_dict()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("strategy, loss_chunk", [("ddp", 0), ("fsdp", 100)])
def test_gradient_accumulation_over_two_workers_sums_every_micro_batch(strategy, loss_chunk, shards, ray_once,
                                                                       tmp_path):
    """2 workers x 2 micro-batches: the all-reduce (DDP) or reduce-scatter (FSDP) is skipped on the first
    micro-batch and must still carry its gradient; the run equals one process that sees all four micro-batches.
    With `loss_chunk` (256 tokens per micro-batch: chunks of 100, 100 and 56), the sharded run's head and loss go
    chunk by chunk while the one-process replica keeps the plain head + cross-entropy. Two fits cover every path:
    FSDP with the plain head is the reference_fsdp run, held to the DDP run above."""
    from models.checkpoint import load_model

    model = CFG.model.model_copy(update={"dropout": 0.0, "loss_chunk": loss_chunk})
    cfg = CFG.model_copy(update={
        "model": model, "strategy": strategy, "steps": 4, "batch_size": 4,
        "batch_tokens": 2 * 2 * 4 * 64, "warmup_steps": 1, "log_every": 2, "eval_every": 100, "ckpt_every": 100})
    result = pretrain_gpt(cfg, ShardsRef(path=str(shards)), tmp_path)
    assert result.counts["tokens"] == 4 * 2 * 2 * 4 * 64
    want_losses, want_weights = _one_process_replica(cfg, shards)
    got = json.loads((tmp_path / "history.json").read_text())["train"]
    assert [s for s, _ in got] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in got], want_losses, rtol=0, atol=1e-5)
    weights = load_model(Path(result.path)).state_dict()
    for name, want in want_weights.items():
        torch.testing.assert_close(weights[name], want, atol=1e-4, rtol=1e-3, msg=name)


_DRIVER = """
import sys
from pathlib import Path
from infra.env import setup_env
setup_env()
from tasks.pretrain import PretrainConfig, pretrain_gpt
from tasks.refs import ShardsRef
pretrain_gpt(PretrainConfig.model_validate_json(sys.argv[1]), ShardsRef(path=sys.argv[2]), Path(sys.argv[3]))
"""




def _assert_same_curve(out: Path, reference: tuple[Path, ModelRef], result: ModelRef) -> dict:
    """The run in `out` logged the reference run's train and val losses at the same steps, and ended on its loss."""
    history = assert_same_curves(out, reference[0])
    assert result.metrics["pretrain/final_train_loss"] == pytest.approx(
        reference[1].metrics["pretrain/final_train_loss"], abs=1e-5)
    return history


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_on_the_workers_an_fsdp_run_left_follows_the_reference(shards, reference, tmp_path):
    """Inside `warm_workers()`, as in the pipeline, a fit takes over the workers of the fit before it (here a short
    FSDP run, which leaves its own seeds, threads and process group behind): the same loss curve as on new ones."""
    from infra.ray_local import kept_worker_pids, warm_workers

    data = ShardsRef(path=str(shards))
    with warm_workers():
        pretrain_gpt(CFG_FSDP.model_copy(update={"steps": 4, "seed": 7, "eval_every": 2, "ckpt_every": 2}), data,
                     tmp_path / "fsdp")
        before = kept_worker_pids()
        result = pretrain_gpt(CFG, data, tmp_path / "after")
        assert len(before) == 2 and kept_worker_pids() == before
    _assert_same_curve(tmp_path / "after", reference, result)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_loss_curve(shards, reference, tmp_path):
    """The driver and every process it started SIGKILLed after its second checkpoint; the rerun resumes. The kill
    and Ray's recovery of the run do not depend on the strategy: FSDP's own part, restoring sharded state, is
    the next test."""
    cfg = CFG
    out = tmp_path / "stage"  # one stage folder for both attempts, as run_stage gives a rerun
    killed_at = kill_after_checkpoint(_DRIVER, [cfg.model_dump_json(), str(shards), str(out)], out / "ray" / "pretrain",
                                      2 * cfg.ckpt_every, tmp_path / "killed_run.log")
    assert killed_at < cfg.steps and not (out / "model").exists(), "the kill came too late to test a resume"
    assert_no_line_repeats((tmp_path / "killed_run.log").read_text())  # the terminal of a fit stays readable

    result = pretrain_gpt(cfg, ShardsRef(path=str(shards)), out)  # the rerun: same folder, same RunConfig(name, storage_path)

    history = _assert_same_curve(out, reference, result)
    assert history["resumes"] == [killed_at]


@pytest.mark.ray
@pytest.mark.slow
def test_fsdp_run_resumes_from_a_checkpoint_to_the_same_loss_curve(shards, reference_fsdp, tmp_path):
    """FSDP's part of a resume: every rank loads the whole weights and AdamW state an FSDP run saved and takes its
    shard of them. The FSDP reference's Ray run folder, copied, with its last checkpoint (step 30) cut short as by
    a crash mid-copy: the rerun resumes from step 25 (one short fit, no kill) and lands on the reference's curve."""
    out = tmp_path / "stage"
    shutil.copytree(reference_fsdp[0] / "ray", out / "ray")
    weights = out / "ray" / "pretrain" / f"checkpoint_{CFG_FSDP.steps:06d}" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    result = pretrain_gpt(CFG_FSDP, ShardsRef(path=str(shards)), out)

    history = _assert_same_curve(out, reference_fsdp, result)
    assert history["resumes"] == [CFG_FSDP.steps - CFG_FSDP.ckpt_every]
