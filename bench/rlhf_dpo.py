"""DPO's share of the RLHF benchmark (`bench/rlhf.py` takes `dpo_step_seconds` in): seconds per optimizer step of
the DPO stage's step on a given model, with the reference's log-probabilities stored once per pair (what the
stage does, `tasks/dpo.py`) and, as the baseline in the same run, with a live reference model that scores every
batch again (what the stage did before, in the driver).

The step is the stage's own: `tasks.dpo_worker.DPOBatches` draws the pairs and computes the loss, and
`tasks.train_worker.train_step` runs forward, backward, clipping and AdamW, in one process (no Ray: the step's
cost, not the collectives'). Pairs: the bundled preference sample (`data/preference/dpo_en_demo.json.gz`),
rendered with the chat template and GPT-2's tokenizer (`tasks.bpe.load_gpt2`), cut to the context.
Measures and prints, asserts nothing.

Run: `python -m bench.rlhf_dpo [--layers 2 --embd 128 --context 128 --batch 8 --steps 5]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from models.config import GPTConfig

DATA = Path(__file__).resolve().parent.parent / "data" / "preference" / "dpo_en_demo.json.gz"
GPT2_VOCAB_PADDED = 50304  # 50,257 GPT-2 ids + our chat tokens, padded to a multiple of 64


def dpo_step_seconds(model_cfg: GPTConfig, batch_size: int = 8, steps: int = 5, warmup: int = 1,
                     live_reference: bool = False, device: str = "cpu", seed: int = 0) -> dict[str, float]:
    """Seconds per DPO optimizer step of a fresh `model_cfg` model on `batch_size` real pairs per step, after
    `warmup` untimed steps; with `live_reference`, a second (frozen) model scores each batch instead of the
    stored log-probs. Also the one-off reference pass over the pairs the steps draw from."""
    from models.checkpoint import load_model, save_model
    from models.gpt import GPT
    from tasks.bpe import load_gpt2
    from tasks.chat import read_preferences
    from tasks.dpo import DPOConfig, encode_pairs, save_pairs
    from tasks.dpo_worker import DPOBatches, store_reference_logps

    torch.manual_seed(seed)
    n_pairs = batch_size * (warmup + steps)
    rows, _ = encode_pairs(read_preferences(DATA)[:n_pairs], load_gpt2(), model_cfg.block_size, "truncate")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_model(GPT(model_cfg), folder / "model")
        for split in ("train", "val"):
            save_pairs(rows, folder / split, 0)
        start = time.perf_counter()
        store_reference_logps(folder / "model", folder / "train", batch_size, device)
        ref_pass = time.perf_counter() - start
        data = DPOBatches(folder, DPOConfig(batch_size=batch_size, seed=seed))
        model = load_model(folder / "model", device).train()
        reference = load_model(folder / "model", device).eval().requires_grad_(False) if live_reference else None
        times = _time_steps(model, data, reference, warmup + steps, device)
        tokens = float(data.train.lengths.sum()) / len(rows) * batch_size  # both answers' rows, per step
    return {"seconds_per_step": float(np.mean(times[warmup:])), "reference_pass_s": ref_pass, "pairs": len(rows),
            "pairs_per_step": batch_size, "tokens_per_step": tokens,
            "params": sum(p.numel() for p in model.parameters())}


def _time_steps(model, data, reference, n: int, device: str) -> list[float]:
    """Wall seconds of `n` DPO optimizer steps (one micro-batch each) through the stage's own `train_step`."""
    from tasks.dpo_worker import sequence_logps
    from tasks.train_worker import train_step

    opt = model.configure_optimizer(1e-4, 0.0, (0.9, 0.95))
    w = SimpleNamespace(world=1, rank=0, accum=1, device=torch.device(device))

    def loss(m, micro):
        if reference is not None:  # score the batch with the reference again, as a live reference must
            with torch.no_grad():
                x, y, _, n_tokens = micro
                micro = (x, y, sequence_logps(reference, x, y)[0].view(2, -1).T, n_tokens)
        return data.loss(m, micro)

    times = []
    for step in range(n):
        start = time.perf_counter()
        train_step(model, opt, data.micro_batches(w, step), 1, 1.0, w.device, nullcontext(), False, loss)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = GPTConfig(arch="llama", vocab_size=GPT2_VOCAB_PADDED, block_size=args.context, n_layer=args.layers,
                    n_head=args.heads, n_embd=args.embd)
    out = {name: dpo_step_seconds(cfg, args.batch, args.steps, live_reference=live, device=args.device)
           for name, live in (("stored_reference", False), ("live_reference", True))}
    stored, live = out["stored_reference"]["seconds_per_step"], out["live_reference"]["seconds_per_step"]
    print(json.dumps(out, indent=2))
    print(f"DPO step: {stored:.3f} s with stored reference log-probs, {live:.3f} s with a live reference "
          f"({live / stored:.2f}x); the one-off reference pass: {out['stored_reference']['reference_pass_s']:.2f} s")
    return out


if __name__ == "__main__":
    main()
