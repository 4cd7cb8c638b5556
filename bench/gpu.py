"""GPU benchmark (run on a CUDA machine; measures and prints, asserts nothing).

Parts, each printed as a table, with a summary last:
  (a) the device: name, bf16 dense matmul throughput measured here (8192^3, median of 10), and the datasheet peak
      of the H100 SXM (989 TFLOP/s dense bf16) that the issue's MFU target is stated against.
  (b) attention kernels at GPT-2 124M shapes (bf16, B x 12 heads x 1024 x 64, causal, forward + backward):
      which SDPA backends run (flash, memory-efficient, cuDNN, math), their times, and the backend SDPA picks.
  (c) GPT-2 124M (12 layers, d_model 768, 12 heads, context 1024, vocabulary 50,304 = 50,257 padded to a
      multiple of 128) trained with the pretraining stage's own step (`tasks.train_worker.train_step`: bf16
      autocast, fused AdamW, clipping) on windows sampled by `TokenWindows` from a memory-mapped shard:
      tokens/s and MFU against the datasheet peak and against the measured matmul, eager and `torch.compile`,
      for several micro-batch sizes, with the plain head + cross-entropy or chunked (`--loss-chunks 0,8192`).
  (d) document masking (LLaMA-style ~124M, context 1024, ~8 documents per window): plain causal SDPA, SDPA with
      a dense document mask, and FlexAttention's block mask, compiled; tokens/s, and the largest difference
      in loss between the dense and the flex mask.
  (e) numerical checks on the GPU: the fp32 logits of a small model equal on CPU and GPU, and KV-cache
      generation gives the same tokens as recomputing the whole prefix.

Ray is not needed (the GPU image has none): part (c) runs the stage's step in one process, which is what each
Ray Train worker runs. Run: `python -m bench.gpu [--quick] [--parts abcde]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.gpt import GPT, GPTConfig
from models.plan import PEAK_BF16_FLOPS
from tasks.train_worker import TokenWindows, train_step

H100_BF16_PEAK = PEAK_BF16_FLOPS["H100"]  # the H100 SXM peak the MFU target is stated against
GPT2_VOCAB_PADDED = 50304


def cuda_time(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds of fn() timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def part_device() -> dict:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul = 2 * n**3 / cuda_time(lambda: a @ b)
    props = torch.cuda.get_device_properties(0)
    row = {"device": props.name, "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
           "torch": torch.__version__, "bf16_matmul_tflops": round(matmul / 1e12, 1),
           "datasheet_bf16_tflops": H100_BF16_PEAK / 1e12}
    print("\n(a) device")
    for k, v in row.items():
        print(f"  {k:24s} {v}")
    return row


def part_attention(batch: int = 16) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = (batch, 12, 1024, 64)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    flops = 4 * batch * 12 * 1024 * 1024 * 64 * 3.5 / 2  # fwd 4BHT^2d (causal: half), bwd 2.5x fwd

    def run() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    rows = []
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH), ("default", None)]:
        ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
        try:
            with ctx:
                t = cuda_time(run)
            rows.append({"backend": name, "ms": round(t * 1e3, 3), "tflops": round(flops / t / 1e12, 1)})
        except RuntimeError as e:
            rows.append({"backend": name, "ms": None, "tflops": None, "error": str(e).splitlines()[0][:80]})
    print(f"\n(b) attention, causal, bf16, q/k/v {shape}, forward + backward")
    for r in rows:
        print(f"  {r['backend']:10s} {r['ms'] if r['ms'] is not None else '-':>9} ms  {r['tflops'] or '-':>7} TFLOP/s"
              + (f"  ({r['error']})" if "error" in r else ""))
    return rows


def synthetic_shards(folder: Path, vocab: int, tokens: int = 50_000_000) -> Path:
    """One uint16 shard of random tokens with the tokenizer stage's index.json layout."""
    rng = np.random.default_rng(0)
    data = np.memmap(folder / "train_000.bin", dtype=np.uint16, mode="w+", shape=(tokens,))
    data[:] = rng.integers(0, vocab, size=tokens, dtype=np.uint16)
    data.flush()
    index = {"dtype": "uint16", "vocab_size": vocab,
             "splits": {"train": {"shards": [{"file": "train_000.bin"}], "tokens": tokens, "bytes": tokens * 4}}}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def train_rate(cfg: GPTConfig, shards: Path, batch: int, compiled: bool, steps: int, warmup: int,
               mode: str | None = None, profile: bool = False) -> dict:
    """Tokens/s of the stage's optimizer step (one micro-batch per step) after `warmup` steps."""
    torch.manual_seed(0)
    raw = GPT(cfg).cuda()
    model = torch.compile(raw, mode=mode) if compiled else raw
    opt = raw.configure_optimizer(6e-4, 0.1)
    windows = TokenWindows(shards, "train", cfg.block_size)
    amp = torch.autocast("cuda", dtype=torch.bfloat16)
    device = torch.device("cuda")
    rng = np.random.default_rng(0)
    losses = []
    t_compile = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
            t_compile = start - t_compile
        loss, _ = train_step(model, opt, [windows.sample(rng, batch)], 1, 1.0, device, amp, False)
        losses.append(loss)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    losses = [v.item() for v in losses]
    if profile:
        print_profile(model, opt, windows, rng, batch, amp, device)
    tps = steps * batch * cfg.block_size / seconds
    flops = tps * raw.flops_per_token()
    peak_mem = torch.cuda.max_memory_allocated() / 2**30
    del model, raw, opt
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return {"batch": batch, "compiled": compiled, "tokens_per_s": round(tps), "model_tflops": round(flops / 1e12, 1),
            "mfu_datasheet": round(flops / H100_BF16_PEAK, 3), "first_steps_s": round(t_compile, 1),
            "peak_mem_gib": round(peak_mem, 1), "loss_first": round(losses[0], 3), "loss_last": round(losses[-1], 3)}


def print_profile(model, opt, windows, rng, batch, amp, device) -> None:
    """The CUDA kernels that take the time in 3 steps, grouped by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            train_step(model, opt, [windows.sample(rng, batch)], 1, 1.0, device, amp, False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


def gpt2_124m(**kw) -> GPTConfig:
    base = dict(arch="gpt2", vocab_size=GPT2_VOCAB_PADDED, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    return GPTConfig(**{**base, **kw})


def part_gpt2(shards: Path, matmul: float, quick: bool, batches: list[int], mode: str | None, eager: bool,
              profile: bool, chunks: list[int]) -> list[dict]:
    rows = []
    plan = [(batches[0], False, 0)] * eager + [(b, True, c) for c in chunks for b in batches]
    for batch, compiled, chunk in plan:
        try:
            r = train_rate(gpt2_124m(loss_chunk=chunk), shards, batch, compiled, steps=10 if quick else 30,
                           warmup=3 if not compiled else 5, mode=mode if compiled else None,
                           profile=profile and compiled and batch == batches[-1])
            r["mode"] = mode or "default"
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            r = {"batch": batch, "compiled": compiled, "error": "out of memory"}
        r["loss_chunk"] = chunk
        r["mfu_measured"] = round(r.get("model_tflops", math.nan) * 1e12 / matmul, 3)
        rows.append(r)
        print(f"  {r}", flush=True)
    n = GPT(gpt2_124m()).num_params()
    print(f"\n(c) GPT-2 124M ({n / 1e6:.1f}M parameters incl. embeddings), context 1024, bf16 autocast, fused AdamW")
    print(f"  {'batch':>5} {'compile':>7} {'chunk':>6} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU(989)':>9} {'MFU(meas)':>9} "
          f"{'mem GiB':>8}")
    for r in rows:
        lead = f"  {r['batch']:>5} {str(r['compiled']):>7} {r['loss_chunk'] or 'off':>6}"
        if "error" in r:
            print(f"{lead} {r['error']}")
            continue
        print(f"{lead} {r['tokens_per_s']:>10,} {r['model_tflops']:>8} "
              f"{r['mfu_datasheet']:>9.1%} {r['mfu_measured']:>9.1%} {r['peak_mem_gib']:>8}")
    return rows


def part_doc_mask(shards: Path, quick: bool) -> list[dict]:
    """Packed windows with ~8 documents each: every ~128th token is the eot."""
    eot = 3
    folder = shards / "doc_mask"  # inside the caller's temporary folder, removed with it
    folder.mkdir()
    data = np.memmap(shards / "train_000.bin", dtype=np.uint16, mode="r")
    docs = np.array(data[:20_000_000])
    docs[np.random.default_rng(1).random(len(docs)) < 1 / 128] = eot
    out = np.memmap(folder / "train_000.bin", dtype=np.uint16, mode="w+", shape=docs.shape)
    out[:] = docs
    out.flush()
    index = json.loads((shards / "index.json").read_text())
    index["splits"]["train"]["tokens"] = len(docs)
    (folder / "index.json").write_text(json.dumps(index))

    base = dict(arch="llama", vocab_size=GPT2_VOCAB_PADDED, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    rows = []
    for name, kw in [("causal", {}), ("dense mask", dict(doc_mask=True, eot_id=eot, flex_attention=False)),
                     ("flex mask", dict(doc_mask=True, eot_id=eot, flex_attention=True))]:
        r = train_rate(GPTConfig(**base, **kw), folder, 16, True, steps=10 if quick else 20, warmup=5)
        rows.append({"attention": name, **r})
        print(f"  {rows[-1]}", flush=True)

    # Same weights, same batch: the flex and dense document masks give the same loss (bf16 autocast).
    torch.manual_seed(0)
    dense = GPT(GPTConfig(**base, doc_mask=True, eot_id=eot, flex_attention=False)).cuda()
    flex = GPT(GPTConfig(**base, doc_mask=True, eot_id=eot, flex_attention=True)).cuda()
    flex.load_state_dict(dense.state_dict())
    x, y = TokenWindows(folder, "train", 1024).sample(np.random.default_rng(2), 8)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ld, lf = dense(x.cuda(), y.cuda())[1].item(), flex(x.cuda(), y.cuda())[1].item()
    print("\n(d) document masking, LLaMA-style 12 x 768, context 1024, batch 16, compiled")
    for r in rows:
        print(f"  {r['attention']:11s} {r['tokens_per_s']:>10,} tokens/s  MFU(989) {r['mfu_datasheet']:.1%}")
    print(f"  loss dense mask {ld:.5f}  flex mask {lf:.5f}  |diff| {abs(ld - lf):.2e}")
    rows.append({"loss_dense": ld, "loss_flex": lf})
    return rows


def part_checks() -> dict:
    from models.generate import generate

    torch.manual_seed(0)
    cfg = GPTConfig(arch="llama", vocab_size=1000, block_size=128, n_layer=2, n_head=4, n_embd=128, n_kv_head=2)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 1000, (2, 64))
    with torch.no_grad():
        cpu = model(idx)[0]
        gpu = model.cuda()(idx.cuda())[0].cpu()
    rel = ((gpu - cpu).norm() / cpu.norm()).item()
    prompts = [torch.randint(0, 1000, (n,)).tolist() for n in (8, 5)]  # unequal lengths: a left-padded batch
    cached = generate(model, prompts, max_new_tokens=24, temperature=0.0, use_cache=True)
    plain = generate(model, prompts, max_new_tokens=24, temperature=0.0, use_cache=False)
    same = cached == plain
    print(f"\n(e) checks: fp32 logits CPU vs GPU relative difference {rel:.2e} (tf32 off); KV cache == no cache: {same}")
    return {"logits_rel_diff": rel, "kv_cache_equal": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--parts", default="abcde")
    ap.add_argument("--batches", default="16,32,48", help="micro-batch sizes for part (c)")
    ap.add_argument("--loss-chunks", default="0", help="part (c): GPTConfig.loss_chunk values, 0 = plain head + loss")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for part (c), e.g. max-autotune")
    ap.add_argument("--no-eager", action="store_true", help="part (c) without the eager baseline")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of the last part (c) run")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA GPU; on CPU run `python -m bench.pretrain`")
    torch.backends.cuda.matmul.allow_tf32 = False
    results: dict = {}
    device = part_device()
    results["device"] = device
    if "b" in args.parts:
        results["attention"] = part_attention()
    with tempfile.TemporaryDirectory() as tmp:
        shards = synthetic_shards(Path(tmp), GPT2_VOCAB_PADDED)
        if "c" in args.parts:
            batches = [int(b) for b in args.batches.split(",")]
            results["gpt2"] = part_gpt2(shards, device["bf16_matmul_tflops"] * 1e12, args.quick, batches,
                                        args.compile_mode, not args.no_eager, args.profile,
                                        [int(c) for c in args.loss_chunks.split(",")])
        if "d" in args.parts:
            results["doc_mask"] = part_doc_mask(shards, args.quick)
    if "e" in args.parts:
        results["checks"] = part_checks()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
    best = max((r for r in results.get("gpt2", []) if "error" not in r), key=lambda r: r["tokens_per_s"], default=None)
    if best:
        print(f"\nsummary: GPT-2 124M best {best['tokens_per_s']:,} tokens/s (batch {best['batch']}, compiled "
              f"{best['compiled']}, loss_chunk {best['loss_chunk']}), MFU {best['mfu_datasheet']:.1%} of the 989 TFLOP/s datasheet peak, "
              f"{best['mfu_measured']:.1%} of the {device['bf16_matmul_tflops']} TFLOP/s measured here")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
