"""GPT-1 task fine-tuning on BoolQ, lambda = 0 against lambda = 0.5, in one run:
`python -m bench.classify --model MODEL_DIR --tokenizer TOKENIZER_DIR [--data FILE] [--set key=value ...]`.

Runs the classify stage's core (`tasks.classify.finetune_classifier`, the same split and schedule for both) once
per lambda on the same pretrained model and prints held-out accuracy beside the majority-class baseline (the train
part's majority label, on the held-out part) and the held-out task and LM losses before and after. Keys for `--set`
are `ClassifyConfig`'s (the paper's defaults unless set). Nothing is logged to MLflow or registered.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from infra.env import setup_env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="pretrained model folder (model.safetensors + config.json)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (tokenizer.json)")
    p.add_argument("--data", help="BoolQ JSONL (default: ClassifyConfig's, the 200 bundled records)")
    p.add_argument("--lambdas", default="0,0.5", help="comma-separated lm_weight values (default 0,0.5)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: small models on busy cores)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()
    setup_env()

    import torch

    from flows.config import parse_sets
    from tasks.classify import ClassifyConfig, finetune_classifier
    from tasks.refs import ModelRef, TokenizerRef

    torch.set_num_threads(args.threads)
    base = parse_sets(args.sets) | ({"data": args.data} if args.data else {})
    rows = []
    for lam in (float(x) for x in args.lambdas.split(",")):
        cfg = ClassifyConfig(**base, lm_weight=lam)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            ref = finetune_classifier(cfg, ModelRef(path=args.model), TokenizerRef(path=args.tokenizer), Path(out))
        rows.append({"lm_weight": lam, "seconds": round(time.perf_counter() - start, 1), "counts": ref.counts,
                     **{k.removeprefix("classify/"): v for k, v in ref.metrics.items()}})
    c = rows[0]["counts"]
    print(f"\nBoolQ: {c['train']} train / {c['held_out']} held-out records ({c['passages_truncated']} passages cut, "
          f"{c['dropped_question_too_long']} dropped), {c['steps']} steps; config {json.dumps(base)}")
    print("| lambda | held-out acc | majority baseline | acc before | held-out task loss before -> after "
          "| held-out LM loss before -> after | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lm_weight']} | {r['heldout_acc']:.3f} | {r['majority_acc']:.3f} | {r['heldout_acc_before']:.3f} "
              f"| {r['heldout_task_loss_before']:.4f} -> {r['heldout_task_loss']:.4f} "
              f"| {r['heldout_lm_loss_before']:.3f} -> {r['heldout_lm_loss']:.3f} | {r['seconds']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
