"""Evaluation benchmark: log-likelihood requests per second of our lm-eval model (`eval.lm.GPTFlowLM`, native
checkpoint) and of lm-eval's `hf` backend (`HFLM`, on the Hugging Face export of the same model), over the same
requests, in one run.

The requests are lm-eval's own: HellaSwag's first `--docs` documents of the bundled data (4 choices each), built
by lm-eval from our task YAML. The model is a random llama-style GPT over GPT-2's vocabulary with our chat
tokens (bundled), context `--block`. Both classes get the same batch size, device and float32; each is warmed
up on a few requests first, then timed on all of them (`loglikelihood`, lm-eval's call). The two results are
compared request by request (max absolute difference of the log-likelihoods), so a fast wrong path shows.

Run: `python -m bench.eval [--docs 200 --batch 16] [--out bench/results/eval_cpu.json]`. Measured
(`bench/results/eval_cpu.json`: 800 requests, batch 16, 4 layers x 128, context 256, 2 threads on 2 CPU cores
shared with other jobs): ours 12.1 requests/s, hf 8.9 (1.36x), log-likelihoods equal to 4e-5. Before ours ran the
output head only on the target positions it was 0.97x (7.8 vs 8.0 requests/s).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


def hellaswag_requests(docs: int, work: Path) -> list:
    """lm-eval's loglikelihood Instances for the first `docs` HellaSwag documents of the bundle."""
    from lm_eval.tasks import TaskManager

    from eval.taskgen import write_task_configs

    tm = TaskManager(include_path=str(write_task_configs(REPO / "data" / "benchmarks", work, ["hellaswag"])),
                     include_defaults=False)
    task = tm.load(["gptflow_hellaswag"])["tasks"]["gptflow_hellaswag"]
    task.build_all_requests(limit=docs)
    return list(task.instances)


def requests_per_s(lm, requests: list, warmup: int = 8) -> tuple[float, list[float]]:
    """(requests per second of `lm.loglikelihood` over all requests, their log-likelihoods)."""
    lm.loglikelihood(requests[:warmup], disable_tqdm=True)
    start = time.perf_counter()
    out = lm.loglikelihood(requests, disable_tqdm=True)
    return len(requests) / (time.perf_counter() - start), [ll for ll, _ in out]


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=200, help="HellaSwag documents (4 requests each)")
    p.add_argument("--batch", type=int, default=16, help="requests per forward pass, both classes")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from lm_eval.models.huggingface import HFLM

    from bench.rlhf_dpo import GPT2_VOCAB_PADDED
    from eval.lm import GPTFlowLM
    from models.checkpoint import save_model
    from models.export import export_hf
    from models.gpt import GPT, GPTConfig
    from tasks.bpe import load_gpt2, save_tokenizer

    torch.manual_seed(0)
    cfg = GPTConfig(arch="llama", vocab_size=GPT2_VOCAB_PADDED, block_size=args.block, n_layer=args.layers,
                    n_head=4, n_embd=args.embd)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_model(GPT(cfg), tmp / "model")
        tok_json = save_tokenizer(load_gpt2(), tmp / "tok")
        export_hf(tmp / "model", tok_json, tmp / "hf")
        requests = hellaswag_requests(args.docs, tmp / "tasks")
        ours = GPTFlowLM(model_dir=tmp / "model", tokenizer=tok_json, batch_size=args.batch, device=device)
        hf = HFLM(pretrained=str(tmp / "hf"), tokenizer=str(tmp / "hf"), device=device, dtype="float32",
                  batch_size=args.batch)
        ours_rate, ours_ll = requests_per_s(ours, requests)
        hf_rate, hf_ll = requests_per_s(hf, requests)
    results = {
        "requests": len(requests),
        "gptflow_requests_per_s": ours_rate,
        "hf_requests_per_s": hf_rate,
        "gptflow_over_hf": ours_rate / hf_rate,
        "max_abs_loglikelihood_diff": max(abs(a - b) for a, b in zip(ours_ll, hf_ll, strict=True)),
    }
    print(f"eval bench: {len(requests)} HellaSwag log-likelihood requests ({args.docs} docs), batch {args.batch}, "
          f"{args.layers} layers x {args.embd}, context {args.block}, {device}")
    for k, v in results.items():
        print(f"  {k:30s} {v:12.6g}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": device,
                                        **results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
