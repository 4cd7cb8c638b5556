"""Recipes on a budget: each preset's data against its schedule, the data-budget check before training, and
pretraining on a wall-clock budget (one 2-worker Ray fit, ~30 s on 2 cores).

Run: `.venv/bin/python -m pytest tests/unit/test_budget.py -x -q`
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from flows.plan import TOKENS_PER_CRAWL_FILE, TRAIN_SHARE, preset_data_tokens, render_plan
from flows.presets import PRESETS, resolve
from models.gpt import GPTConfig
from models.plan import param_count
from tasks.data.inputs import read_listing
from tasks.pretrain import (
    PretrainConfig,
    check_compiler,
    check_data_budget,
    check_memory,
    pretrain_gpt,
    worker_memory_bytes,
)
from tasks.refs import ShardsRef
from tasks.stage import GptflowError
from tasks.train_config import lr_at, lr_at_time

TINY_TRAIN_TOKENS = 184_863  # the tiny pipeline's shards (bundled crawl + C4 demo, 2,048 BPE), from its index.json


# ---------------------------------------------------------------- presets and their data (no Ray)


# `shakespeare` trains on one fixed text for a wall-clock budget, repeating it on purpose (allow_repeats).
@pytest.mark.parametrize("name", [p for p in PRESETS if p != "shakespeare"])
def test_each_preset_resolves_and_its_data_covers_its_schedule(name):
    cfg = resolve(name).pretrain
    planned = cfg.steps * cfg.tokens_per_step
    have = TINY_TRAIN_TOKENS if name == "tiny" else preset_data_tokens(name)
    assert check_data_budget(cfg, have) <= 1.0  # each preset's own data: at most one pass
    if name != "tiny":  # on the tiny sample instead, the bigger presets stop with the numbers
        with pytest.raises(GptflowError, match=rf"{planned:,} tokens .* hold {TINY_TRAIN_TOKENS:,} training tokens"):
            check_data_budget(cfg, TINY_TRAIN_TOKENS)
        assert resolve(name).data.max_files * TOKENS_PER_CRAWL_FILE * TRAIN_SHARE >= planned


def test_an_unreachable_listing_names_itself_and_where_to_point_instead():
    # The presets' listing, on a host that does not exist (hermetic: no request leaves the machine).
    listing = resolve("small").data.inputs[0].replace("https://data.commoncrawl.org", "file:///nonexistent")
    with pytest.raises(FileNotFoundError, match=r"crawl listing not found: file:///nonexistent/crawl-data/"
                                                r"CC-MAIN-2024-22/wet.paths.gz .* --set 'data.inputs="):
        read_listing(listing)


def test_plan_prints_data_and_cost():
    out = render_plan("gpt2-124m", None, "h100", 0.4, 8, price_per_hour=2.0)
    assert "9,999,745,024 train tokens = 14,035 Common Crawl files" in out
    assert "6.0 GPU-hours x $2.00 = $12" in out
    assert "1.00 passes" in out


def test_schedule_on_the_clock_spans_warmup_and_reaches_the_floor():
    cfg = PretrainConfig(model=GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8),
                         steps=100, warmup_steps=10, lr=1e-3, time_budget_s=10)
    assert lr_at_time(0.5, 10, cfg) == pytest.approx(lr_at(5, cfg))  # 5% of the time = 5% of the steps
    assert lr_at_time(1.0, 10, cfg) == pytest.approx(cfg.lr)  # warmup ends at 10% of the time
    assert lr_at_time(10, 10, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    assert lr_at_time(30, 10, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio)  # past the budget: the floor


# ---------------------------------------------------------------- the check in the stage, and a time budget (Ray)


MODEL = GPTConfig(arch="llama", vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=32)


def test_a_long_schedule_on_a_small_corpus_stops_before_training(shards, tmp_path):
    train = json.loads((shards / "index.json").read_text())["splits"]["train"]["tokens"]
    cfg = PretrainConfig(model=MODEL, steps=5000, batch_size=8, num_workers=2)  # 5,000 x 1,024 = 5.1M tokens
    passes = 5000 * 1024 / train
    assert passes > 4
    with pytest.raises(GptflowError, match=rf"5,120,000 tokens .* hold {train:,} training tokens: {passes:,.1f} passes"):
        pretrain_gpt(cfg, ShardsRef(path=str(shards)), tmp_path / "out")
    assert not (tmp_path / "out" / "ray").exists()  # stopped before Ray was asked for anything
    allowed = cfg.model_copy(update={"allow_repeats": True})
    assert check_data_budget(allowed, train) == pytest.approx(passes)
    assert check_data_budget(cfg.model_copy(update={"max_passes": math.ceil(passes)}), train) == pytest.approx(passes)


def test_a_model_bigger_than_the_machine_stops_before_training_with_the_numbers(shards, tmp_path):
    import psutil

    big = MODEL.model_copy(update={"n_layer": 48, "n_embd": 4096, "n_head": 32})  # ~9.7B parameters, 16 B each
    cfg = PretrainConfig(model=big, steps=1, batch_size=8, num_workers=2)
    need = worker_memory_bytes(cfg)
    assert need["states"] == 16 * param_count(big)
    assert 2 * need["total"] > psutil.virtual_memory().available
    with pytest.raises(GptflowError, match=r"pretraining needs about [\d,.]+ GB but this machine's available RAM has "
                                           r"[\d,.]+ GB: per worker [\d,.]+ GB of weights.* x 2 workers"):
        pretrain_gpt(cfg, ShardsRef(path=str(shards)), tmp_path / "out")
    assert not (tmp_path / "out" / "ray").exists()  # stopped before Ray was asked for anything
    assert check_memory(cfg.model_copy(update={"memory_check": False})) is None
    fsdp = worker_memory_bytes(cfg.model_copy(update={"strategy": "fsdp"}))
    assert fsdp["states"] == need["states"] / 2  # sharded over the two workers
    assert check_memory(resolve("tiny").pretrain)["total"] < 1e9  # the tiny preset fits


def test_compile_on_cpu_without_a_compiler_stops_before_training(shards, tmp_path, monkeypatch):
    cfg = PretrainConfig(model=MODEL, steps=5, batch_size=8, num_workers=1, compile=True)
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(GptflowError, match=r"compile=true on CPU needs a C\+\+ compiler .* 'no-such-compiler' was "
                                           r"not found on PATH: .* set pretrain.compile=false"):
        pretrain_gpt(cfg, ShardsRef(path=str(shards)), tmp_path / "out")
    assert not (tmp_path / "out" / "ray").exists()
    check_compiler(cfg.model_copy(update={"compile": False}))  # nothing to build without compile
    check_compiler(cfg.model_copy(update={"use_gpu": True}))  # on GPU torch builds Triton kernels, not C++


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="torch.compile on CPU needs g++")
def test_a_compiled_fit_trains_and_saves_plain_weights(shards, ray_once, tmp_path):
    # the shakespeare recipe compiles (~20 s for its model, then ~25% more steps in its 10 minutes), with its
    # speedrun options, in bf16 autocast (cpu_bf16 "auto" there; "on" here, so any CPU runs the bf16 path)
    from models.checkpoint import load_model

    speedrun = {"dropout": 0.1, "qk_norm": True, "mlp": "relu2", "logit_softcap": 15.0, "x0_mix": True}
    cfg = PretrainConfig(model=MODEL.model_copy(update=speedrun), steps=8, batch_size=4, lr=1e-2,
                         warmup_steps=0, num_workers=1, cpus_per_worker=2, compile=True, optimizer="muon",
                         cpu_bf16="on", log_every=4, eval_every=8, ckpt_every=8)
    ref = pretrain_gpt(cfg, ShardsRef(path=str(shards)), tmp_path / "out", run=None)
    assert ref.metrics["pretrain/bf16_autocast"] == 1.0
    losses = [loss for _, loss in json.loads((tmp_path / "out" / "history.json").read_text())["train"]]
    assert len(losses) == 8 and losses[0] == pytest.approx(math.log(512), abs=0.3)  # from a uniform guess
    assert losses[-1] < losses[0] - 0.1  # it learns (6.25 -> 6.07 measured)
    model = load_model(tmp_path / "out" / "model")  # the uncompiled module's names, no "_orig_mod." prefix
    assert "wte.weight" in model.state_dict() and model.config.qk_norm and "x0_a" in model.state_dict()


@pytest.mark.ray
@pytest.mark.slow
def test_time_budget_ends_within_a_step_and_the_schedule_reaches_its_floor(shards, ray_once, tmp_path):
    # with the quality recipe's other two options: Muon on 2 DDP workers, and the whole validation split scored
    from models.checkpoint import load_model
    from tasks.heldout import split_bits_per_byte

    budget = 8.0
    cfg = PretrainConfig(model=MODEL, steps=100_000, batch_size=8, lr=3e-3, warmup_steps=5_000, num_workers=2,
                         log_every=1, eval_every=100_000, ckpt_every=100_000, time_budget_s=budget,
                         allow_repeats=True, optimizer="muon", heldout_bpb=True, heldout_stride=MODEL.block_size // 2)
    ref = pretrain_gpt(cfg, ShardsRef(path=str(shards)), tmp_path / "out", run=None)
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    stop = history["stop"]
    assert stop["reason"] == "time_budget" and 10 < stop["step"] < cfg.steps
    step_s = stop["elapsed_s"] / stop["step"]
    assert budget <= stop["elapsed_s"] < budget + 3 * step_s, stop  # ends within about one step of the budget
    assert ref.counts == {"steps": stop["step"], "tokens": stop["step"] * cfg.tokens_per_step}
    assert ref.metrics["pretrain/tokens"] == stop["tokens"] and ref.metrics["pretrain/stopped_by_time_budget"] == 1.0
    assert ref.metrics["pretrain/bf16_autocast"] == 0.0  # cpu_bf16 is off by default
    ckpt = sorted((tmp_path / "out" / "ray").rglob("train_state.json"))[-1]
    assert json.loads(ckpt.read_text())["elapsed_s"] == stop["elapsed_s"]  # the clock a resume continues from
    model = load_model(tmp_path / "out" / "model")
    bpb = split_bits_per_byte(model, shards, stride=MODEL.block_size // 2)
    val = json.loads((shards / "index.json").read_text())["splits"]["val"]
    assert ref.metrics["pretrain/heldout_bpb"] == pytest.approx(bpb)
    assert ref.metrics["pretrain/heldout_bpb_disjoint"] == pytest.approx(split_bits_per_byte(model, shards))
    assert bpb < val["tokens"] * math.log2(512) / val["bytes"]  # better than a uniform guess
