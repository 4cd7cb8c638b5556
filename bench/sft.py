"""SFT benchmark: tokens/s and peak memory of fine-tuning variants on the same model and the same batches.

Variants (`VARIANTS`, one line each): full fine-tuning against LoRA (`models.lora`), both on padded batches
(`tasks.sft.pad_batch`). A packed batcher goes into `BATCHERS`, and the packed variant is then one more line.

Data: the bundled Alpaca sample (`data/sft/alpaca_en_demo.json.gz`), read and rendered by the SFT stage's own
`tasks.chat.read_sft`/`render` with GPT-2's tokenizer and our chat tokens (`tasks.bpe.load_gpt2`), so the loss falls
on assistant tokens only. Model by default: GPT-2 style, 6 layers, d_model 384, 6 heads, context 256, vocabulary
50,304 (50,262 padded). That is ~30M parameters, enough that full fine-tuning's gradients and AdamW moments
(12 bytes per trainable parameter) show in the memory.

Measured per variant, each in a fresh subprocess, so that no variant inherits another's allocator state:
  - tokens/s: non-pad tokens of the timed steps over their wall time, after `--warmup` untimed steps;
  - peak memory: the process's max RSS at the end minus its RSS after the model and the data are loaded (on CUDA:
    `max_memory_allocated` minus what was allocated then), i.e. what training adds: activations, AdamW moments
    (8 bytes per trainable parameter) and gradients (4; they grow as the backward frees activations, so the peak,
    at the start of the backward, holds little of them);
  - trainable and total parameters, and the final loss (a sanity check, not a quality measure).
The steps see identical batches in every variant, shortest first (so the longest step runs with the optimizer's
state allocated). Measures and prints, asserts nothing.

Run: `python -m bench.sft [--steps 3] [--layers 6 --embd 384] [--out bench/results/sft_cpu.json]` (1 min 22 s on 2
CPU cores at load 2, ~7 min at load 7).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from models.lora import LoraOptions

ALPACA = Path(__file__).resolve().parent.parent / "data" / "sft" / "alpaca_en_demo.json.gz"
GPT2_VOCAB_PADDED = 50304  # 50,257 GPT-2 ids + our 5 chat tokens, padded to a multiple of 64
RESULT = "RESULT "  # prefix of the child's one JSON line on stdout


@dataclass(frozen=True)
class Variant:
    name: str
    lora: LoraOptions | None = None  # None: full fine-tuning
    batching: str = "padded"  # a key of BATCHERS


VARIANTS = [
    Variant("full"),
    Variant("lora", LoraOptions(rank=16, alpha=32.0)),  # dropout 0: adapters share the frozen layer's saved input
    Variant("lora-drop", LoraOptions(rank=16, alpha=32.0, dropout=0.05)),  # + a dropped copy of that input
]


# ---------------------------------------------------------------- data and batches


def padded_batches(rows: list, batch_size: int, pad_id: int, seed: int) -> Iterator[tuple]:
    """Batches of `batch_size` conversations drawn in a seeded order, each right-padded to its longest row."""
    from tasks.sft import pad_batch

    rng = random.Random(seed)
    while True:
        yield pad_batch(rng.sample(rows, min(batch_size, len(rows))), pad_id)


BATCHERS: dict[str, Callable[..., Iterator[tuple]]] = {"padded": padded_batches}


def load_rows(examples: int, block_size: int) -> tuple[list, int]:
    """(ids, labels) rows of the first `examples` Alpaca conversations with at least one assistant label."""
    from models.tokens import PAD
    from tasks.bpe import load_gpt2
    from tasks.chat import IGNORE, read_sft, render

    tok = load_gpt2()
    rows = [render(c, tok, block_size) for c in read_sft(ALPACA)[:examples]]
    return [r for r in rows if any(label != IGNORE for label in r[1][1:])], tok.token_to_id(PAD)


# ---------------------------------------------------------------- one variant (in a child process)


def rss_mib() -> float:
    """The process's current resident set (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_variant(v: Variant, args: argparse.Namespace) -> dict:
    """Load model and data, train `warmup` + `steps` steps, and measure; meant to run alone in its process."""
    import contextlib

    import torch

    from models.gpt import GPT, GPTConfig
    from models.lora import add_lora, count_parameters

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = GPTConfig(arch="gpt2", vocab_size=GPT2_VOCAB_PADDED, block_size=args.context, n_layer=args.layers,
                    n_head=args.heads, n_embd=args.embd, loss_chunk=args.loss_chunk)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    if v.lora is not None:
        model = add_lora(model, v.lora)
    rows, pad_id = load_rows(args.examples, cfg.block_size)
    draw = BATCHERS[v.batching](rows, args.batch, pad_id, seed=0)
    # Drawn before the baseline is taken, shortest first: the longest batch then comes after the optimizer holds its
    # state (AdamW allocates its moments at the first step), so the peak is that of a steady-state step.
    batches = iter(sorted((next(draw) for _ in range(args.warmup + args.steps)), key=lambda xy: xy[0].numel()))
    opt = model.configure_optimizer(args.lr, weight_decay=0.0)
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    base_rss = rss_mib()
    model.train()

    def step() -> tuple[float, int, int]:
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        with amp:
            loss = model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), int((x != pad_id).sum()), x.numel()

    for _ in range(args.warmup):
        step()
    t0, tokens, slots, loss = time.perf_counter(), 0, 0, float("nan")
    for _ in range(args.steps):
        loss, n, s = step()
        tokens, slots = tokens + n, slots + s
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 - base if device.type == "cuda" else max_rss_mib() - base_rss
    return {"variant": v.name, "batching": v.batching, "lora": v.lora.model_dump() if v.lora else None,
            **count_parameters(model), "tokens_per_s": tokens / seconds, "tokens": tokens,
            "pad_share": 1 - tokens / slots, "peak_mib": peak, "loaded_mib": base_rss, "final_loss": loss,
            "assistant_rows": len(rows), "seconds": seconds}


def run_child(v: Variant, argv: list[str]) -> dict:
    """`run_variant` in a fresh interpreter; its result is the one `RESULT {json}` line it prints."""
    cmd = [sys.executable, "-m", "bench.sft", *argv, "--child", v.name]
    # A fixed mmap threshold: glibc then maps every large tensor and unmaps it when freed, so RSS follows live
    # memory. Its default raises the threshold as tensors are freed and keeps later ones in the heap, whose freed
    # pages stay resident: we measured +/- 200 MiB of noise in the peak without this.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"variant {v.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(RESULT))


# ---------------------------------------------------------------- main


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    print(f"\n  {'variant':>8} {'batching':>8} {'trainable':>11} {'of total':>9} {'tokens/s':>9} {'x':>6} "
          f"{'pad %':>6} {'peak MiB':>9} {'x':>6} {'AdamW+grads':>15} {'loss':>7}")
    for r in rows:
        print(f"  {r['variant']:>8} {r['batching']:>8} {r['trainable']:11,} {100 * r['trainable_share']:8.2f}% "
              f"{r['tokens_per_s']:9.0f} {r['tokens_per_s'] / base['tokens_per_s']:6.2f} {100 * r['pad_share']:6.1f} "
              f"{r['peak_mib']:9.0f} {r['peak_mib'] / max(base['peak_mib'], 1e-9):6.2f} "
              f"{12 * r['trainable'] / 2**20:11.0f} MiB {r['final_loss']:7.3f}")


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="python -m bench.sft", description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6, help="n_layer of the GPT-2-style model")
    ap.add_argument("--embd", type=int, default=384, help="n_embd (d_model)")
    ap.add_argument("--heads", type=int, default=6, help="n_head")
    ap.add_argument("--context", type=int, default=256, help="block_size: conversations are cut to it")
    ap.add_argument("--loss-chunk", type=int, default=0, help="GPTConfig.loss_chunk (0: plain head + cross-entropy)")
    ap.add_argument("--batch", type=int, default=8, help="conversations per step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--examples", type=int, default=999, help="Alpaca conversations to render (999 in the file)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--variants", nargs="+", default=[v.name for v in VARIANTS], help="which VARIANTS to run")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per variant")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one variant and print its RESULT line
    raw = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(raw)
    child_argv = [a for i, a in enumerate(raw) if a != "--child" and (i == 0 or raw[i - 1] != "--child")]
    return args, child_argv


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> list[dict]:
    args, child_argv = parse(argv)
    by_name = {v.name: v for v in VARIANTS}
    unknown = [n for n in args.variants if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(by_name)}")
    if args.child:
        print(RESULT + json.dumps(run_variant(by_name[args.child], args)), flush=True)
        return []
    one, five, _ = os.getloadavg()
    print(f"bench.sft: GPT-2-style {args.layers} layers, d_model {args.embd}, context {args.context}, vocabulary "
          f"{GPT2_VOCAB_PADDED}; {args.batch} Alpaca conversations/step, {args.warmup} + {args.steps} steps per "
          f"variant on {args.device}, {args.threads} threads, load {one:.1f}/{five:.1f}", flush=True)
    rows = []
    for name in args.variants:
        rows.append(run_child(by_name[name], child_argv))
        print(f"  {name}: {rows[-1]['tokens_per_s']:.0f} tokens/s, peak +{rows[-1]['peak_mib']:.0f} MiB", flush=True)
    print("\ntokens/s: non-pad tokens; peak MiB: memory added by training (max RSS, or CUDA max allocated, minus "
          "after loading); AdamW+grads: 12 B per trainable parameter; x: ratio to the first variant")
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
