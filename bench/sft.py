"""SFT benchmark: tokens/s and peak memory of fine-tuning variants on the same model and the same conversations.

Variants (`VARIANTS`, one line each): full fine-tuning against LoRA (`models.lora`), on padded batches (one
conversation per row, right-padded to the batch's longest, `tasks.sft.pad_batch`) and on packed ones (the SFT
stage's windows, `tasks.packing`: each conversation closed by `<|endoftext|>` (`fit_rows`), several to a window of
context + 1 tokens (`pack`), batches trimmed to their longest window (`batch`); the model's document mask on with
eot_id = the `<|endoftext|>` id, so no conversation attends to another and positions restart at 0 per
conversation, as `tasks.sft_worker.base_model` sets it). A batcher is one function in `BATCHERS`.

Fairness: packed and padded steps train on the same conversations. The conversations are packed once, as the
stage packs its training set (`tasks.sft.make_windows`), and each step draws windows from a seeded permutation
(as `tasks.sft_worker.SFTBatches` does), as many as hold `--batch` conversations on average; the padded batch of
that step is those windows' conversations, one per row. So both see the same conversations, the same assistant
targets (the losses are equal to float rounding: the document mask makes a packed conversation compute what it
computes alone) and the same real tokens up to two per conversation (a window also feeds a conversation's last
token and its eot as inputs, 1 % more here). The steps run in the same order, shortest padded batch first.
tokens/s counts real (non-pad) input tokens, so the two layouts compare on the work that trains, and the padding
share shows what each computes in vain. On CPU the padded batches take
SDPA's plain causal path, the packed ones an explicit (B, 1, T, T) document mask (on CUDA: FlexAttention).

Data: the bundled Alpaca sample (`data/sft/alpaca_en_demo.json.gz`), read and rendered by the SFT stage's own
`tasks.chat.read_sft`/`render` with GPT-2's tokenizer and our chat tokens (`tasks.bpe.load_gpt2`), so the loss falls
on assistant tokens only. Model by default: GPT-2 style, 6 layers, d_model 384, 6 heads, context 256, vocabulary
50,304 (50,262 padded). That is ~30M parameters, enough that full fine-tuning's gradients and AdamW moments
(12 bytes per trainable parameter) show in the memory.

Measured per variant, each in a fresh subprocess, so that no variant inherits another's allocator state:
  - tokens/s: real (non-pad) input tokens of the timed steps over their wall time, after `--warmup` untimed steps;
  - padding share: pad tokens over the batches' slots (B x T) in the timed steps;
  - peak memory: the process's max RSS at the end minus its RSS after the model and the data are loaded (on CUDA:
    `max_memory_allocated` minus what was allocated then), i.e. what training adds: activations, AdamW moments
    (8 bytes per trainable parameter) and gradients (4; they grow as the backward frees activations, so the peak,
    at the start of the backward, holds little of them);
  - trainable and total parameters, and the final loss (a sanity check, not a quality measure).
Measures and prints, asserts nothing.

Run: `python -m bench.sft [--steps 3] [--layers 6 --embd 384] [--out bench/results/sft_cpu.json]` (4 min 9 s on 2
CPU cores shared at load 4-5, 3 min of CPU time; ~2.5 min at load 2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from models.lora import LoraOptions

if TYPE_CHECKING:
    import numpy as np
    import torch

    from tasks.packing import Windows

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
    Variant("full-pack", batching="packed"),
    Variant("lora-pack", LoraOptions(rank=16, alpha=32.0), batching="packed"),
]


# ---------------------------------------------------------------- data and batches


def conversations(windows: Windows, rows: np.ndarray, eot_id: int) -> list[tuple[list[int], list[int]]]:
    """The (ids, labels) conversations packed into windows `rows`, each without its closing eot."""
    out = []
    for r in rows:
        n = int(windows.lengths[r])
        ids, labels = windows.ids[r, :n].tolist(), windows.labels[r, :n].tolist()
        start = 0
        for i, t in enumerate(ids):
            if t == eot_id:
                out.append((ids[start:i], labels[start:i]))
                start = i + 1
    return out


def padded_batch(windows: Windows, rows: np.ndarray, pad_id: int, eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One conversation per row, right-padded to the longest (`tasks.sft.pad_batch`)."""
    from tasks.sft import pad_batch

    return pad_batch(conversations(windows, rows, eot_id), pad_id)


def packed_batch(windows: Windows, rows: np.ndarray, pad_id: int, eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed windows themselves, trimmed to the longest (`tasks.packing.batch`, as the SFT workers)."""
    import torch

    from tasks.packing import batch

    x, y = batch(windows, rows)
    return torch.from_numpy(x), torch.from_numpy(y)


# batching -> (the batch of a step's windows, whether the model needs its document mask)
BATCHERS: dict[str, Callable[..., tuple]] = {"padded": padded_batch, "packed": packed_batch}
DOC_MASKED = {"packed"}  # batchings whose rows hold several conversations


def load_windows(examples: int, block_size: int) -> tuple[Windows, int, int]:
    """The first `examples` Alpaca conversations with at least one assistant label, fitted to the context and
    packed as the SFT stage packs them (`tasks.sft.make_windows`, too_long="truncate"); and the pad and eot ids."""
    from models.tokens import EOT, PAD
    from tasks.bpe import load_gpt2
    from tasks.chat import IGNORE, read_sft, render
    from tasks.packing import fit_rows, pack

    tok = load_gpt2()
    pad_id, eot_id = tok.token_to_id(PAD), tok.token_to_id(EOT)
    rows = [render(c, tok, block_size) for c in read_sft(ALPACA)[:examples]]
    rows = [r for r in rows if any(label != IGNORE for label in r[1][1:])]
    assert not any(eot_id in ids for ids, _ in rows), "an eot inside a conversation would split it"
    fitted, _ = fit_rows(rows, block_size, eot_id, "truncate")
    return pack(fitted, block_size, pad_id), pad_id, eot_id


def step_rows(windows: Windows, conversations_per_step: int, steps: int, seed: int) -> list[np.ndarray]:
    """The windows of each step: a seeded permutation (a new one each epoch) cut into steps of as many windows
    as hold `conversations_per_step` conversations on average."""
    import numpy as np

    n = len(windows.lengths)
    k = max(1, min(n, round(conversations_per_step * n / windows.counts["conversations"])))
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(-(-steps * k // n))])
    return [order[i * k : (i + 1) * k] for i in range(steps)]


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
    from tasks.chat import IGNORE

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    windows, pad_id, eot_id = load_windows(args.examples, args.context)
    cfg = GPTConfig(arch="gpt2", vocab_size=GPT2_VOCAB_PADDED, block_size=args.context, n_layer=args.layers,
                    n_head=args.heads, n_embd=args.embd, loss_chunk=args.loss_chunk,
                    doc_mask=v.batching in DOC_MASKED, eot_id=eot_id)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    if v.lora is not None:
        model = add_lora(model, v.lora)
    # Drawn before the baseline is taken, in every variant in the same order, the shortest padded batch first:
    # the longest then comes after the optimizer holds its state (AdamW allocates its moments at the first step),
    # so the peak is that of a steady-state step. (Packed batches are all about as long.)
    steps = sorted(step_rows(windows, args.batch, args.warmup + args.steps, seed=0),
                   key=lambda rows: padded_batch(windows, rows, pad_id, eot_id)[0].numel())
    batches = iter([BATCHERS[v.batching](windows, rows, pad_id, eot_id) for rows in steps])
    opt = model.configure_optimizer(args.lr, weight_decay=0.0)
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    base_rss = rss_mib()
    model.train()

    def step() -> tuple[float, int, int, int]:
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        with amp:
            loss = model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), int((x != pad_id).sum()), x.numel(), int((y != IGNORE).sum())

    for _ in range(args.warmup):
        step()
    t0, tokens, slots, targets, loss = time.perf_counter(), 0, 0, 0, float("nan")
    for _ in range(args.steps):
        loss, n, s, t = step()
        tokens, slots, targets = tokens + n, slots + s, targets + t
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 - base if device.type == "cuda" else max_rss_mib() - base_rss
    return {"variant": v.name, "batching": v.batching, "lora": v.lora.model_dump() if v.lora else None,
            **count_parameters(model), "tokens_per_s": tokens / seconds, "tokens": tokens, "targets": targets,
            "pad_share": 1 - tokens / slots, "peak_mib": peak, "loaded_mib": base_rss, "final_loss": loss,
            "conversations": windows.counts["conversations"], "windows": len(windows.lengths),
            "rows_per_step": [len(r) if v.batching in DOC_MASKED else len(conversations(windows, r, eot_id))
                              for r in steps], "seconds": seconds}


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
    print(f"\n  {'variant':>9} {'batching':>8} {'trainable':>11} {'of total':>9} {'tokens/s':>9} {'x':>6} "
          f"{'pad %':>6} {'peak MiB':>9} {'x':>6} {'AdamW+grads':>15} {'loss':>7}")
    for r in rows:
        print(f"  {r['variant']:>9} {r['batching']:>8} {r['trainable']:11,} {100 * r['trainable_share']:8.2f}% "
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
    ap.add_argument("--batch", type=int, default=8,
                    help="conversations per step, on average: each step draws the packed windows holding about as many")
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
    print("\ntokens/s: real (non-pad) tokens; pad %: pad share of the batch slots; peak MiB: memory added by training (max RSS, or CUDA max allocated, minus "
          "after loading); AdamW+grads: 12 B per trainable parameter; x: ratio to the first variant")
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
