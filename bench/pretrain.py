"""Pretraining benchmark: measures and prints, asserts nothing.

Default run (about 6 minutes on 2 CPU cores), a table per part and a summary:
  (a) training tokens/s and MFU of a reference ~14M-parameter LLaMA-style GPT (the `small` preset's shape: 6 layers,
      d_model 384, 6 heads, context 256, vocabulary 8,192) in one process on all cores, for a few batch sizes.
      MFU = model FLOP/s (tokens/s x `GPT.flops_per_token`, i.e. 6N + attention) / fp32 matmul throughput
      measured in the same run (`tasks.train_worker.matmul_flops`). Both are best-of-N, because other processes
      share the machine; the load average is printed with the results.
  (b) fused attention (`F.scaled_dot_product_attention(is_causal=True)`) against a naive masked softmax,
      forward + backward, at the reference shapes.
  (c) the pretraining stage itself (`pretrain_gpt`, Ray Train): tokens/s with 1 worker x 2 CPUs against
      2 workers x 1 CPU, on a small model and few steps.
  (d) the output head and the loss in chunks (`GPTConfig.loss_chunk`) against the plain head + cross-entropy, on
      the reference model with GPT-2's 50,304-id vocabulary: tokens/s and the memory a training step needs.

Quality run: `--budget-minutes N` trains on tiny-shakespeare (the last 10 % of the text held out), with our
byte-level BPE trained on the first 90 %, for N minutes of wall clock in one process, and prints the held-out
bits per byte.

Run: `python -m bench.pretrain [--profile] [--compile]` or `python -m bench.pretrain --budget-minutes 10`.
"""

from __future__ import annotations

from infra.env import REPO_ROOT, setup_env, workspace

setup_env()  # before anything imports ray

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.gpt import GPT, GPTConfig  # noqa: E402
from tasks.heldout import split_bits_per_byte  # noqa: E402
from tasks.pretrain import PretrainConfig  # noqa: E402
from tasks.refs import ShardsRef  # noqa: E402
from tasks.train_config import lr_at  # noqa: E402
from tasks.train_worker import TokenWindows, matmul_flops  # noqa: E402

SHAKESPEARE = REPO_ROOT / "data" / "text" / "tinyshakespeare.txt.gz"
CPU = torch.device("cpu")


def reference_model() -> GPTConfig:
    """The `small` preset's model: 6 x (4 d^2 attention + 3 x 384 x 1024 SwiGLU) + 8192 x 384 tied = 13.8M."""
    return GPTConfig(arch="llama", vocab_size=8192, block_size=256, n_layer=6, n_head=6, n_embd=384)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} cores"


def make_optimizer(model: GPT, lr: float = 1e-3, weight_decay: float = 0.1) -> torch.optim.Optimizer:
    return model.configure_optimizer(lr, weight_decay)  # foreach AdamW on CPU, fused on GPU, as in tasks.pretrain


# ---------------------------------------------------------------- (a) tokens/s and MFU


def time_train_steps(cfg: GPTConfig, batch: int, steps: int, compile: bool = False) -> dict:
    """`steps` optimizer steps (forward, backward, AdamW) on random tokens after one warm-up step, each between two
    fp32 matmul measurements: a step's MFU is over the mean of its neighbours, so contention from other processes
    on the machine hits numerator and denominator alike."""
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = make_optimizer(model)
    fwd = torch.compile(model) if compile else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1))
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        loss = fwd(inp, tgt)[1]
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    for _ in range(3):  # warm-up: the first steps run 2-5x slower (allocations, kernel selection, the compile)
        step()
    peaks, times = [matmul_flops(CPU, torch.float32, seconds=0.3)], []
    for _ in range(steps):
        times.append(step())
        peaks.append(matmul_flops(CPU, torch.float32, seconds=0.3))
    flops = batch * cfg.block_size * model.flops_per_token()
    mfus = [flops / sum(t) / ((a + b) / 2) for t, a, b in zip(times, peaks, peaks[1:], strict=False)]
    best = min(times, key=sum)
    return {"tokens_per_s": batch * cfg.block_size / sum(best), "fwd_s": best[0], "bwd_s": best[1], "opt_s": best[2],
            "peak": max(peaks), "mfu": float(np.median(mfus)), "mfu_max": max(mfus),
            "flops_per_token": model.flops_per_token(), "params": model.num_params()}


def bench_mfu(batches: tuple[int, ...], steps: int, compile: bool) -> list[dict]:
    cfg = reference_model()
    return [{"batch": b, **time_train_steps(cfg, b, steps, compile)} for b in batches]


def profile_step(batch: int) -> None:
    """Where a training step's time goes, by aten op (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = reference_model()
    model = GPT(cfg)
    opt = make_optimizer(model)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1))
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step() -> None:
        model(inp, tgt)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile of one step, batch {batch} (self CPU time by op):")
    for e in events[:12]:
        print(f"  {e.key[:48]:48s} {100 * e.self_cpu_time_total / total:5.1f} %  calls {e.count}")


# ---------------------------------------------------------------- (b) fused vs naive attention


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + causal mask) v, materialising the (B, nh, T, T) scores."""
    T, hd = q.size(-2), q.size(-1)
    att = (q @ k.transpose(-2, -1)) * hd**-0.5  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return att @ v  # (B, nh, T, hd)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def bench_attention(B: int, nh: int, T: int, hd: int, repeats: int = 5) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, nh, T, hd, generator=g, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, nh, T, hd, generator=g)

    def run(fn) -> tuple[float, torch.Tensor, tuple[torch.Tensor, ...]]:
        best = math.inf
        for _ in range(repeats + 1):  # the first call warms up
            t = time.perf_counter()
            out = fn(q, k, v)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
            best = min(best, time.perf_counter() - t)
        return best, out.detach(), (dq, dk, dv)

    t_fused, o_fused, g_fused = run(fused_attention)
    t_naive, o_naive, g_naive = run(naive_attention)
    err = max([(o_fused - o_naive).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(g_fused, g_naive, strict=True)])
    return {"fused_ms": 1e3 * t_fused, "naive_ms": 1e3 * t_naive, "max_abs_diff": err}


# ---------------------------------------------------------------- (d) chunked head + loss at a large vocabulary


def _rss() -> int:
    """Resident bytes of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss(out: dict, every_s: float = 0.001) -> Iterator[None]:
    """Samples the resident memory while the block runs; out["peak"] is the highest sample. Torch releases the
    GIL in its kernels, so the sampler runs while they do."""
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["peak"] = max(out.get("peak", 0), _rss())
            time.sleep(every_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _head_loss_run(chunk: int, vocab: int, batch: int, steps: int) -> dict:
    """In a fresh process: the reference model with `vocab` ids and `loss_chunk=chunk`; the fastest training step,
    and the most memory a step holds above the weights and AdamW's states (glibc told to return large blocks to
    the system when freed, see `bench_head_loss`, so the resident size follows what torch holds)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    cfg = reference_model().model_copy(update={"vocab_size": vocab, "loss_chunk": chunk})
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = make_optimizer(model)
    x = torch.randint(0, vocab, (batch, cfg.block_size + 1))
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    best, losses, above = math.inf, [], 0
    for i in range(steps + 1):  # the first step, untimed, creates AdamW's states
        base, mem = _rss(), {}
        t = time.perf_counter()
        with peak_rss(mem):
            loss = model(inp, tgt)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if i:
            best = min(best, time.perf_counter() - t)
            above = max(above, mem["peak"] - base)
        losses.append(loss.item())
    return {"loss_chunk": chunk, "tokens_per_s": batch * cfg.block_size / best, "step_mib": above / 2**20,
            "loss_first": losses[0]}


def bench_head_loss(chunks: list[int], vocab: int, batch: int, steps: int) -> list[dict]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a fresh process each, started with the environment below
    os.environ["BENCH_THREADS"] = str(torch.get_num_threads())
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # glibc: blocks over 64 KiB are mapped, and unmapped when freed
    rows = []
    try:
        for chunk in chunks:
            with ctx.Pool(1) as pool:
                rows.append(pool.apply(_head_loss_run, (chunk, vocab, batch, steps)))
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    return rows


# ---------------------------------------------------------------- data: tiny-shakespeare shards


def shakespeare_shards(text_file: Path, vocab_size: int, out: Path) -> Path:
    """The tokenizer stage's own tail split (`val_split="tail"`): a BPE trained on the text's first 90 %, the last
    10 % of its characters as the validation split. Cached in `out`."""
    from tasks.refs import CorpusRef
    from tasks.tokenizer import TokenizerConfig, build_tokenizer

    if not (out / "shards" / "index.json").exists():
        if not text_file.exists():
            raise SystemExit(f"tiny-shakespeare not found at {text_file}; pass --text PATH")
        build_tokenizer(TokenizerConfig(vocab_size=vocab_size, val_fraction=0.1, val_split="tail"),
                        CorpusRef(path=str(text_file)), out)
    return out / "shards"


# ---------------------------------------------------------------- (c) 1 vs 2 Ray workers


def bench_ray_workers(shards: Path, vocab_size: int, steps: int) -> list[dict]:
    from tasks.pretrain import pretrain_gpt

    model = GPTConfig(arch="llama", vocab_size=vocab_size, block_size=128, n_layer=2, n_head=4, n_embd=128)
    rows = []
    for workers, cpus in ((1, 2), (2, 1)):
        # the same global batch (16 x 128 tokens per step) either way
        cfg = PretrainConfig(model=model, steps=steps, batch_size=16 // workers, lr=3e-3, warmup_steps=5,
                             num_workers=workers, cpus_per_worker=cpus, log_every=steps // 2, eval_every=steps,
                             eval_batches=1, ckpt_every=steps)
        with tempfile.TemporaryDirectory(dir=workspace()) as tmp:  # a fresh folder: nothing to resume
            t = time.perf_counter()
            result = pretrain_gpt(cfg, ShardsRef(path=str(shards)), Path(tmp))
            wall = time.perf_counter() - t
        m = result.metrics
        rows.append({"workers": workers, "cpus": cpus, "tokens_per_s": m["pretrain/tokens_per_s"],
                     "mfu": m["pretrain/mfu"], "fit_s": m["pretrain/fit_seconds"], "wall_s": wall})
    return rows


# ---------------------------------------------------------------- quality run on a wall-clock budget


def budget_config(vocab_size: int) -> PretrainConfig:
    """~1M parameters (4 x 213k + 131k tied embedding), dropout for the repeated data: at ~3k tokens/s on 2 idle
    cores, 10 minutes is ~1.8M tokens, about 4 passes over the 412k training tokens. `steps` only sets the
    resolution of the clock-driven schedule (see `budget_run`)."""
    model = GPTConfig(arch="llama", vocab_size=vocab_size, block_size=256, n_layer=4, n_head=4, n_embd=128,
                      dropout=0.1)
    return PretrainConfig(model=model, steps=1000, batch_size=8, lr=3e-3, warmup_steps=30, min_lr_ratio=0.1,
                          weight_decay=0.1, seed=1337, num_workers=1)


def budget_run(text_file: Path, minutes: float, vocab_size: int) -> None:
    t_start = time.perf_counter()
    shards = shakespeare_shards(text_file, vocab_size, workspace() / "bench" / f"shakespeare_bpe{vocab_size}")
    index = json.loads((shards / "index.json").read_text())
    cfg = budget_config(index["vocab_size"])
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    train = TokenWindows(shards, "train", cfg.model.block_size)
    tokens_per_step = cfg.batch_size * cfg.model.block_size
    budget = 60 * minutes
    print(f"budget run: {model.num_params() / 1e6:.2f}M params, {tokens_per_step} tokens/step, "
          f"{index['splits']['train']['tokens']} train / {index['splits']['val']['tokens']} val tokens, "
          f"{torch.get_num_threads()} threads, {load()}", flush=True)

    # The schedule runs on the clock: warmup over the first steps, then the cosine's progress is the share of the
    # budget used, mapped onto cfg.steps "virtual" steps, so the decay ends exactly when the time does.
    t0 = time.perf_counter()  # the budget counts training only (the tokenizer is cached after the first run)
    step, loss, t_warm = 0, torch.tensor(float("nan")), None
    while (elapsed := time.perf_counter() - t0) < budget:
        if step < cfg.warmup_steps:
            virtual = step
        else:
            t_warm = t_warm if t_warm is not None else elapsed
            virtual = cfg.warmup_steps + (cfg.steps - cfg.warmup_steps) * (elapsed - t_warm) / (budget - t_warm)
        for group in opt.param_groups:
            group["lr"] = lr_at(int(virtual), cfg)
        x, y = train.sample(np.random.default_rng([cfg.seed, step, 0]), cfg.batch_size)
        loss = model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 50 == 0:
            print(f"  step {step} loss {loss.item():.3f} lr {opt.param_groups[0]['lr']:.2e} {elapsed:.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    tokens = step * tokens_per_step
    tps = tokens / seconds
    bpb = split_bits_per_byte(model, shards)
    print(f"\nRESULT val bits/byte {bpb:.4f} | {step} steps, {tokens / 1e6:.2f}M tokens "
          f"({tokens / index['splits']['train']['tokens']:.1f} epochs) in {seconds:.0f} s, {tps:.0f} tokens/s, "
          f"final train loss {loss.item():.3f} | total {time.perf_counter() - t_start:.0f} s | {load()}")


# ---------------------------------------------------------------- (e) step speed against nanoGPT


def load_nanogpt(checkout: Path):
    """nanoGPT's `model.py` from the user's checkout, imported under its own module name (nothing of it is here)."""
    import contextlib
    import importlib.util
    import io

    path = Path(checkout) / "model.py"
    if not path.exists():
        raise SystemExit(f"--nanogpt: no model.py in {checkout} (a checkout of github.com/karpathy/nanoGPT)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(io.StringIO()):
        spec.loader.exec_module(module)
    return module


def bench_nanogpt(checkout: Path, contexts: tuple[int, ...], rounds: int, tokens_per_step: int) -> list[dict]:
    """One training step (forward with the loss, backward, clip to 1.0, AdamW step) of our GPT-2-style model and
    of nanoGPT's on the same configuration (nanoGPT's CPU recipe: 4 layers, 4 heads, d_model 128, no bias, no
    dropout, exact GELU; a 65-id character vocabulary), each with its own optimizer set-up, alternating step by step in this
    process so that load from other processes falls on both alike. The batch keeps the tokens per step fixed."""
    import contextlib
    import io

    nano = load_nanogpt(checkout)
    rows = []
    for T in contexts:
        batch = max(1, tokens_per_step // T)
        ours_cfg = GPTConfig(arch="gpt2", vocab_size=65, block_size=T, n_layer=4, n_head=4, n_embd=128, bias=False,
                             gelu="exact")  # nanoGPT's nn.GELU(): erf, not GPT-2's tanh approximation
        theirs_cfg = nano.GPTConfig(block_size=T, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                                    bias=False)
        torch.manual_seed(0)
        ours = GPT(ours_cfg)
        with contextlib.redirect_stdout(io.StringIO()):  # nanoGPT prints its parameter counts
            theirs = nano.GPT(theirs_cfg)
            theirs_opt = theirs.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
        models = {"ours": (ours, make_optimizer(ours)), "nanogpt": (theirs, theirs_opt)}
        x = torch.randint(0, 65, (batch, T + 1))
        inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()

        def step(model: torch.nn.Module, opt: torch.optim.Optimizer, inp=inp, tgt=tgt) -> float:
            t = time.perf_counter()
            loss = model(inp, tgt)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t

        times: dict[str, list[float]] = {k: [] for k in models}
        for r in range(rounds + 3):  # 3 warm-up rounds
            order = list(models) if r % 2 == 0 else list(models)[::-1]  # neither always goes first
            for name in order:
                dt = step(*models[name])
                if r >= 3:
                    times[name].append(dt)
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows.append({"context": T, "batch": batch, "ours_ms": 1e3 * med["ours"], "nanogpt_ms": 1e3 * med["nanogpt"],
                     "params_ours": ours.num_params(), "params_nanogpt": sum(p.numel() for p in theirs.parameters())})
    return rows


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--budget-minutes", type=float, help="quality run: train on tiny-shakespeare for this long")
    ap.add_argument("--text", type=Path, default=SHAKESPEARE, help="tiny-shakespeare (.txt.gz)")
    ap.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary for the tiny-shakespeare runs")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16], help="(a) batch sizes to time")
    ap.add_argument("--steps", type=int, default=5, help="(a) timed steps per batch size")
    ap.add_argument("--ray-steps", type=int, default=40, help="(c) steps per Ray run")
    ap.add_argument("--compile", action="store_true", help="(a) torch.compile the model too")
    ap.add_argument("--profile", action="store_true", help="(a) print a per-op profile of one step")
    ap.add_argument("--skip-ray", action="store_true", help="leave out (c)")
    ap.add_argument("--head-chunks", type=int, nargs="+", default=[0, 512],
                    help="(d) loss_chunk values to compare at GPT-2's vocabulary (0: plain head + cross-entropy)")
    ap.add_argument("--nanogpt", type=Path, metavar="DIR",
                    help="(e) only: time our training step against nanoGPT's, from a checkout of it at DIR")
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024], help="(e) contexts to time")
    ap.add_argument("--rounds", type=int, default=20, help="(e) timed steps of each model per context")
    ap.add_argument("--step-tokens", type=int, default=8192, help="(e) tokens per step (batch = this / context)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.nanogpt:
        rows = bench_nanogpt(args.nanogpt, tuple(args.contexts), args.rounds, args.step_tokens)
        print(f"(e) one training step, ours vs nanoGPT ({args.nanogpt}), GPT-2 style 4 x 128, "
              f"{args.step_tokens} tokens per step, median of {args.rounds} alternating steps, {load()}")
        print(f"  {'context':>7} {'batch':>5} {'ours ms':>8} {'nanoGPT ms':>10} {'nanoGPT/ours':>12} {'params':>18}")
        for r in rows:
            print(f"  {r['context']:>7} {r['batch']:>5} {r['ours_ms']:8.1f} {r['nanogpt_ms']:10.1f} "
                  f"{r['nanogpt_ms'] / r['ours_ms']:12.2f} {r['params_ours']:>8,}/{r['params_nanogpt']:,}")
        return
    if args.budget_minutes:
        budget_run(args.text, args.budget_minutes, args.vocab)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load()}", flush=True)
    rows = bench_mfu(tuple(args.batches), args.steps, compile=False)
    if args.compile:
        rows += [{**r, "batch": f"{r['batch']} compiled"} for r in bench_mfu((max(args.batches),), args.steps, True)]
    print(f"\n(a) reference model {rows[0]['params'] / 1e6:.1f}M params, context 256, "
          f"{rows[0]['flops_per_token'] / 1e6:.1f} MFLOP/token; best fp32 matmul {max(r['peak'] for r in rows) / 1e9:.1f} "
          f"GFLOP/s; tokens/s and phases of the fastest step; MFU per step against the matmul runs around it")
    print(f"  {'batch':>12} {'tokens/s':>9} {'fwd s':>7} {'bwd s':>7} {'adamw s':>8} {'MFU median':>11} {'MFU max':>8}")
    for r in rows:
        print(f"  {r['batch']!s:>12} {r['tokens_per_s']:9.0f} {r['fwd_s']:7.3f} {r['bwd_s']:7.3f} {r['opt_s']:8.3f} "
              f"{100 * r['mfu']:10.1f}% {100 * r['mfu_max']:7.1f}%")
    if args.profile:
        profile_step(max(args.batches))

    att = bench_attention(B=8, nh=6, T=256, hd=64)
    print(f"\n(b) attention fwd+bwd (8, 6, 256, 64): fused {att['fused_ms']:.1f} ms, naive {att['naive_ms']:.1f} ms, "
          f"naive/fused {att['naive_ms'] / att['fused_ms']:.2f}x (max |diff| {att['max_abs_diff']:.1e})", flush=True)

    head = bench_head_loss(args.head_chunks, 50304, batch=8, steps=args.steps)
    print("\n(d) output head + cross-entropy, reference model with GPT-2's 50,304 ids, batch 8 x 256 tokens:")
    print(f"  {'loss_chunk':>10} {'tokens/s':>9} {'MiB above weights + AdamW':>26} {'first loss':>11}")
    for r in head:
        print(f"  {r['loss_chunk'] or 'off':>10} {r['tokens_per_s']:9.0f} {r['step_mib']:26.0f} {r['loss_first']:11.4f}",
              flush=True)

    ray_rows = []
    if not args.skip_ray:
        shards = shakespeare_shards(args.text, args.vocab, workspace() / "bench" / f"shakespeare_bpe{args.vocab}")
        ray_rows = bench_ray_workers(shards, args.vocab, args.ray_steps)
        print("\n(c) pretrain_gpt (Ray Train), 2-layer d128 model, 2,048 tokens/step:")
        print(f"  {'workers x cpus':>15} {'tokens/s':>9} {'MFU/worker':>11} {'fit s':>7}")
        for r in ray_rows:
            print(f"  {r['workers']:>11} x {r['cpus']} {r['tokens_per_s']:9.0f} {100 * r['mfu']:10.1f}% {r['fit_s']:7.1f}")

    best = max(rows, key=lambda r: r["mfu"])
    print(f"\nSUMMARY ({load()})")
    print(f"  (a) MFU {100 * best['mfu']:.1f}% (median over steps) at batch {best['batch']}, "
          f"{best['tokens_per_s']:.0f} tokens/s; target 55%: {'met' if best['mfu'] >= 0.55 else 'NOT met'}")
    print(f"  (b) fused attention is {att['naive_ms'] / att['fused_ms']:.2f}x faster than naive")
    plain, small = head[0], min(head, key=lambda r: r["step_mib"])
    print(f"  (d) loss_chunk={small['loss_chunk']}: {small['step_mib']:.0f} MiB at a step's peak against {plain['step_mib']:.0f} "
          f"MiB plain (above weights and AdamW states), tokens/s x{small['tokens_per_s'] / plain['tokens_per_s']:.2f}")
    if ray_rows:
        print(f"  (c) 2 workers x 1 CPU / 1 worker x 2 CPUs tokens/s = "
              f"{ray_rows[1]['tokens_per_s'] / ray_rows[0]['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
