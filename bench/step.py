"""The shakespeare recipe's training step on CPU, part by part: measures and prints, asserts nothing.

The preset's model (LLaMA style, 5 layers x 128 with its speedrun options, context 256, 8 windows a step, dropout
0.2, Muon) in one process on all cores, in four set-ups, alternating rounds so that the machine's load falls on
each alike:
  before   torch's dropout (`F.dropout`: a float per element from `bernoulli_`), Muon one matrix at a time, RMSNorm
           as separate ops
  eager    ours: dropout masks from random bytes (`models.gpt.byte_dropout`), Muon's Newton-Schulz batched over
           same-shape matrices, RMSNorm through `F.rms_norm`
  compile  the same under `torch.compile` (its compile time printed apart)
  bf16     compiled, under bf16 autocast (`pretrain.cpu_bf16`): matmuls in bf16, attention in fp32, Muon's
           Newton-Schulz in bf16; faster only on a CPU with bf16 matrix units (AMX, printed)
Medians of each part (forward, backward, gradient clip, AdamW, Muon) and of the whole step, tokens/s, ratios.

With `--options`, the set-ups are instead the compiled preset without the speedrun options of `models.gpt`, with
each one (qk_norm, mlp=relu2, logit_softcap=15, x0_mix) and with all four: what each costs per step.

Run: `python -m bench.step [--options] [--rounds 4] [--steps 10]` (about 3-4 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

import models.gpt as gpt
from flows.presets import resolve
from models.optim import Muon

PARTS = ("forward", "backward", "clip", "adamw", "muon")
COMPILED = ("compile", "bf16")  # the set-ups under torch.compile
NONE = {"qk_norm": False, "mlp": "swiglu", "logit_softcap": None, "x0_mix": False}
OPTIONS = {"none": NONE, "qk_norm": {**NONE, "qk_norm": True}, "relu2": {**NONE, "mlp": "relu2"},
           "softcap": {**NONE, "logit_softcap": 15.0}, "x0_mix": {**NONE, "x0_mix": True},
           "all four": {"qk_norm": True, "mlp": "relu2", "logit_softcap": 15.0, "x0_mix": True}}


@contextmanager
def before():
    """torch's dropout and the composite RMSNorm, as the model had them."""
    drop, norm = gpt.byte_dropout, gpt.RMSNorm.forward
    gpt.byte_dropout, gpt.RMSNorm.forward = (lambda x, p: F.dropout(x, p, training=True)), gpt.RMSNorm.composite
    try:
        yield
    finally:
        gpt.byte_dropout, gpt.RMSNorm.forward = drop, norm


def build(setup: str, model_options: dict | None = None) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    cfg = resolve("shakespeare").pretrain
    torch.manual_seed(0)
    raw = gpt.GPT(cfg.model.model_copy(update=model_options or {})).train()
    opt = raw.configure_optimizer(cfg.lr, cfg.weight_decay, optimizer="muon",
                                  muon_dtype=torch.bfloat16 if setup == "bf16" else None)
    if setup == "before":  # a group per matrix: each orthogonalised on its own
        matrices = [p for g in opt.muon.param_groups for p in g["params"]]
        opt.muon = Muon([{"params": [p]} for p in matrices], lr=cfg.lr, weight_decay=cfg.weight_decay)
        opt.parts = (opt.adamw, opt.muon)
    model = torch.compile(raw) if setup in COMPILED or model_options is not None else raw
    return raw, model, opt


def run_steps(setup: str, raw, model, opt, batch: tuple[torch.Tensor, torch.Tensor], n: int) -> list[dict]:
    x, y = batch
    out = []
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if setup == "bf16" else nullcontext()
    with before() if setup == "before" else nullcontext():
        for _ in range(n):
            t = [time.perf_counter()]
            with amp:
                loss = model(x, y)[1]
            t.append(time.perf_counter())
            loss.backward()
            t.append(time.perf_counter())
            torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
            t.append(time.perf_counter())
            opt.adamw.step()
            t.append(time.perf_counter())
            opt.muon.step()
            t.append(time.perf_counter())
            opt.zero_grad()
            out.append({p: t[i + 1] - t[i] for i, p in enumerate(PARTS)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per set-up per round")
    ap.add_argument("--options", action="store_true", help="the compiled preset against its speedrun options")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = resolve("shakespeare").pretrain
    g = torch.Generator().manual_seed(0)
    shape = (cfg.batch_size, cfg.model.block_size)
    batch = (torch.randint(0, cfg.model.vocab_size, shape, generator=g),
             torch.randint(0, cfg.model.vocab_size, shape, generator=g))
    if args.options:
        setups = {name: build("compile", kw) for name, kw in OPTIONS.items()}
    else:
        setups = {name: build(name) for name in ("before", "eager", "compile", "bf16")}
        print(f"AMX bf16 tiles: {torch.cpu._is_amx_tile_supported()}")
    for name, (raw, model, opt) in setups.items():  # warm-up; the compile happens here
        start = time.perf_counter()
        run_steps(name, raw, model, opt, batch, 3)
        compiled = args.options or name in COMPILED
        print(f"{name}: first 3 steps {time.perf_counter() - start:.1f} s" + (" (includes compiling)" * compiled))
    times: dict[str, list[dict]] = {name: [] for name in setups}
    for r in range(args.rounds):
        for name, (raw, model, opt) in setups.items():
            times[name] += run_steps(name, raw, model, opt, batch, args.steps)
        print(f"round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}")
    tokens = shape[0] * shape[1]
    print(f"\nmedian ms per part, {tokens:,} tokens a step, {torch.get_num_threads()} threads")
    first = next(iter(times))
    print(f"{'set-up':<9} " + " ".join(f"{p:>9}" for p in PARTS) + f" {'step':>9} {'tokens/s':>9} {'vs ' + first:>10}")
    base = statistics.median(sum(s.values()) for s in times[first])
    for name, steps in times.items():
        step = statistics.median(sum(s.values()) for s in steps)
        parts = " ".join(f"{1e3 * statistics.median(s[p] for s in steps):9.1f}" for p in PARTS)
        print(f"{name:<9} {parts} {1e3 * step:9.1f} {tokens / step:9,.0f} {base / step:9.2f}x")


if __name__ == "__main__":
    main()
