"""Run the benchmark suite with lm-eval on a saved model, and report it.

- `run_benchmarks(...)`: evaluates a saved model on the local task copies (see `eval/tasks/`, `eval/prepare.py`)
  with `lm_eval.simple_evaluate` and a `TaskManager` that only knows those tasks; writes results.json,
  results.md and samples/<task>.jsonl (per-document scores, `write_samples`).
- `plot_results(results, png_path)`: bar chart of the accuracies and perplexities.

The model is scored through `eval.lm.GPTFlowLM` (lm-eval model "gptflow", registered when this module is imported).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from eval.benchmarks import CHANCE, GENERATIVE_TASKS, TASKS
from eval.lm import GPTFlowLM
from eval.taskgen import GROUP, expand_tasks, lm_eval_name, short_name, write_task_configs

DEFAULT_BOOTSTRAP_ITERS = 1000  # lm-eval's default is 100000: minutes of CPU for perplexity stderrs
DEFAULT_SEED = 1234  # lm-eval's default fewshot/torch/numpy seed


# ----------------------------------------------------------------------------------------------------------
# results


_SKIP_KEYS = {"alias", "name", "sample_len", "sample_count", " "}


def _metrics_of(entry: dict[str, Any]) -> tuple[dict[str, float], dict[str, float | None]]:
    """lm-eval's {"acc,none": v, "acc_stderr,none": s, ...} -> ({"acc": v}, {"acc": s})."""
    values: dict[str, float] = {}
    stderrs: dict[str, float | None] = {}
    for key, val in entry.items():
        if key in _SKIP_KEYS or "," not in key:
            continue
        metric, _, filt = key.partition(",")
        if filt != "none":
            metric = f"{metric}[{filt}]"
        if metric.endswith("_stderr") or "_stderr[" in metric:
            base = metric.replace("_stderr", "")
            stderrs[base] = float(val) if isinstance(val, (int, float)) else None
        elif isinstance(val, (int, float)):
            values[metric] = float(val)
    return values, {m: stderrs.get(m) for m in values}


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "N/A"
    return f"{v:.4f}"


def results_table(results: dict[str, dict[str, float]], stderr: dict[str, dict[str, float | None]]) -> str:
    lines = ["| task | metric | value | stderr |", "|---|---|---|---|"]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            lines.append(f"| {task} | {metric} | {_fmt(value)} | {_fmt(stderr.get(task, {}).get(metric))} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# running the suite


def run_benchmarks(
    model_dir: Path,
    tokenizer_json: Path,
    tasks: list[str],
    limit: int | None,
    data_dir: Path,
    out_dir: Path,
    batch_size: int = 16,
    *,
    num_fewshot: int = 0,
    seed: int = DEFAULT_SEED,
    chat_template: bool = False,
    cache_dir: Path | None = None,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
    device: str = "auto",
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Evaluate the model in `model_dir` on `tasks`; write results.json, results.md and samples/<task>.jsonl.

    tasks: short names ("hellaswag", "arithmetic", ...), their "gptflow_" names, or "core" for the nine
    log-likelihood tasks (adds a "core" row with the unweighted mean acc). limit: first N documents of each task
    (None = all). data_dir: folder with `<task>.jsonl.gz` (e.g. the repo's `data/benchmarks`). num_fewshot:
    examples from each task's own few-shot split, drawn with `seed` (every lm-eval seed is `seed`).
    chat_template: prompts rendered as chat turns (lm-eval's `apply_chat_template`). cache_dir: lm-eval's
    request cache, one SQLite file per model content hash there. `model` (optional) is used instead of loading
    `model_dir`. Returns {"results": {task: {metric: value}}, "stderr": {...}, "table_md": str,
    "samples_count": {task: {"original": N, "effective": n}}, "config": {..., "model_hash"}, ...}.
    """
    t0 = time.perf_counter()
    if not tasks:
        raise ValueError("no tasks given")
    leaves = expand_tasks(tasks)  # validates names
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task_dir = write_task_configs(Path(data_dir), out_dir / "lm_eval_tasks", leaves)  # checks the data files
    if not Path(tokenizer_json).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer_json}")
    lm = GPTFlowLM(model=model, model_dir=None if model is not None else model_dir, tokenizer=tokenizer_json,
                   batch_size=batch_size, device=device)
    model_hash = content_hash(lm.model, tokenizer_json)
    cache = None if cache_dir is None else str(Path(cache_dir) / f"lm-eval-{model_hash[:24]}")
    wanted = [lm_eval_name(t) for t in tasks]
    wanted = [GROUP] if GROUP in wanted else list(dict.fromkeys(wanted))
    if GROUP in wanted:
        wanted += [lm_eval_name(t) for t in leaves if t not in TASKS]
    raw = _simple_evaluate(lm, wanted, limit, task_dir, bootstrap_iters=bootstrap_iters, num_fewshot=num_fewshot,
                           seed=seed, chat_template=chat_template, cache=cache)
    results, stderr = _collect(raw, [lm_eval_name(t) for t in leaves] + ([GROUP] if GROUP in wanted else []))
    write_samples(raw, out_dir / "samples")
    config = {"model_dir": str(model_dir), "tokenizer": str(tokenizer_json), "tasks": list(tasks), "limit": limit,
              "batch_size": batch_size, "num_fewshot": num_fewshot, "seed": seed, "chat_template": chat_template,
              "bootstrap_iters": bootstrap_iters, "model_hash": model_hash, "device": str(lm.device)}
    summary = _summary(raw, results, stderr, lm, config, round(time.perf_counter() - t0, 2))
    _write_reports(summary, out_dir)
    return summary


def content_hash(model: torch.nn.Module, tokenizer_json: Path) -> str:
    """sha256 of the model's weights (names, shapes, dtypes, bytes), its config and the tokenizer file: what
    decides every answer, so the request cache never serves one model's answers to another."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update(repr(config.model_dump() if hasattr(config, "model_dump") else config).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(Path(tokenizer_json).read_bytes())
    return h.hexdigest()


def _simple_evaluate(lm: GPTFlowLM, wanted: list[str], limit: int | None, task_dir: Path, *, bootstrap_iters: int,
                     num_fewshot: int, seed: int, chat_template: bool, cache: str | None) -> dict[str, Any]:
    """lm-eval on the rendered task folder only (indexing its built-in tasks costs ~19 s)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    raw = lm_eval.simple_evaluate(
        model=lm,
        tasks=wanted,
        num_fewshot=num_fewshot,
        limit=limit,
        use_cache=cache,
        task_manager=tm,
        bootstrap_iters=bootstrap_iters,
        log_samples=True,
        apply_chat_template=chat_template,
        fewshot_as_multiturn=chat_template,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    shutil.rmtree(task_dir / ".datasets_cache", ignore_errors=True)  # Arrow copies of the data: not results
    if raw is None:  # only on non-zero ranks, which never happens here
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return raw


def write_samples(raw: dict[str, Any], samples_dir: Path) -> dict[str, Path]:
    """`<samples_dir>/<task>.jsonl`, one line per document, in doc_id order:
    {"doc_id": index in the task's evaluation split (its line in the data file), "metrics": {metric: per-document
    value}, "loglikelihoods": [one per request: each choice's, or the document's rolling one], "target": the gold
    answer as lm-eval's doc_to_target gives it}, and "response" (the generated text) for generative tasks."""
    samples_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, samples in raw.get("samples", {}).items():
        path = samples_dir / f"{short_name(name)}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for s in sorted(samples, key=lambda s: s["doc_id"]):
                f.write(json.dumps(_sample_line(s), default=str) + "\n")
        files[short_name(name)] = path
    return files


def _sample_line(sample: dict[str, Any]) -> dict[str, Any]:
    resps = sample["filtered_resps"]  # one per request: (loglikelihood, is_greedy), a rolling float, or text
    line: dict[str, Any] = {"doc_id": int(sample["doc_id"]), "metrics": {m: sample[m] for m in sample["metrics"]}}
    if resps and isinstance(resps[0], str):
        line["loglikelihoods"], line["response"] = [], resps[0]
    else:
        line["loglikelihoods"] = [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in resps]
    line["target"] = sample.get("target")
    return line


def _collect(raw: dict[str, Any], names: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float | None]]]:
    """({task: {metric: value}}, {task: {metric: stderr}}) of the lm-eval task and group `names`."""
    results: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float | None]] = {}
    entries = {**raw.get("results", {}), **raw.get("groups", {})}
    for name in names:
        if name not in entries:
            raise RuntimeError(f"lm-eval returned no results for {name}")
        values, errs = _metrics_of(entries[name])
        results[short_name(name)], stderr[short_name(name)] = values, errs
    return results, stderr


def _summary(raw: dict[str, Any], results: dict[str, dict[str, float]], stderr: dict[str, dict[str, float | None]],
             lm: GPTFlowLM, config: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What results.json holds: scores, stderrs, sample counts, the table, the run's settings and versions."""
    import lm_eval

    samples_count = {
        short_name(k): {"original": int(v["original"]), "effective": int(v["effective"])}
        for k, v in raw.get("n-samples", {}).items()
    }
    return {
        "results": results,
        "stderr": stderr,
        "samples_count": samples_count,
        "table_md": results_table(results, stderr),
        "config": {
            **config,
            "block_size": lm.max_length,
            "n_params": sum(p.numel() for p in lm.model.parameters()),
            "lm_eval_version": getattr(lm_eval, "__version__", None),
        },
        "versions": {short_name(k): v for k, v in raw.get("versions", {}).items()},
        "higher_is_better": {short_name(k): v for k, v in raw.get("higher_is_better", {}).items()},
        "seconds": seconds,
    }


def _write_reports(summary: dict[str, Any], out_dir: Path) -> None:
    """results.json (the summary) and results.md (a header and the table)."""
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    config = summary["config"]
    header = f"# Benchmarks\n\nmodel: `{config['model_dir']}` ({config['n_params']:,} parameters), limit: {config['limit']}\n\n"
    (out_dir / "results.md").write_text(header + summary["table_md"])


# ----------------------------------------------------------------------------------------------------------
# plotting

PERPLEXITY_METRICS = ("perplexity", "word_perplexity", "byte_perplexity")


def mark_chance(ax: Any, tasks: list[str]) -> None:
    """A dashed line at each task's chance accuracy (`eval.benchmarks.CHANCE`) over its group of bars."""
    for i, t in enumerate(tasks):
        if t in CHANCE:
            ax.hlines(CHANCE[t], i - 0.45, i + 0.45, colors="k", linestyles="dashed", linewidth=1)


def plot_results(results: dict[str, Any], png_path: Path) -> Path:
    """Bar chart (PNG): acc / acc_norm per task with chance levels, and perplexities on a log scale.

    Accepts the dict returned by run_benchmarks or its "results" part ({task: {metric: value}}).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stderr = results.get("stderr", {}) if "results" in results else {}
    res = results.get("results", results)
    acc_tasks = [t for t, m in res.items() if "acc" in m]
    ppl = [(f"{t}\n{m}", v) for t, ms in res.items() for m, v in ms.items() if m in PERPLEXITY_METRICS]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1.3]})
    ax = axes[0]
    width = 0.38
    for j, metric in enumerate(("acc", "acc_norm")):
        xs = [i + (j - 0.5) * width for i, t in enumerate(acc_tasks) if metric in res[t]]
        ys = [res[t][metric] for t in acc_tasks if metric in res[t]]
        errs = [(stderr.get(t, {}).get(metric) or 0.0) for t in acc_tasks if metric in res[t]]
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=metric)
    mark_chance(ax, acc_tasks)
    ax.set_xticks(range(len(acc_tasks)), acc_tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy (dashed: chance)")
    ax.legend(loc="upper right")
    ax2 = axes[1]
    if ppl:
        ax2.bar(range(len(ppl)), [v for _, v in ppl], color="tab:red")
        ax2.set_xticks(range(len(ppl)), [n for n, _ in ppl], rotation=30, ha="right", fontsize=8)
        ax2.set_yscale("log")
        ax2.set_title("perplexity (lower is better)")
    else:
        ax2.set_axis_off()
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# ----------------------------------------------------------------------------------------------------------
# CLI: python -m eval.harness --model-dir DIR --tokenizer tokenizer.json --out DIR [--tasks core] [--limit N]


def main(argv: list[str] | None = None) -> int:
    import argparse

    repo = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(prog="python -m eval.harness", description="Run the gptflow benchmark suite.")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tasks", nargs="+", default=["core"], help=f"any of: core {' '.join(TASKS + GENERATIVE_TASKS)}")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--data-dir", type=Path, default=repo / "data" / "benchmarks")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--chat-template", action="store_true", help="render prompts as chat turns (chat models)")
    p.add_argument("--cache-dir", type=Path, default=None, help="lm-eval request cache, keyed by the model's hash")
    p.add_argument("--device", default="auto")
    p.add_argument("--plot", action="store_true", help="also write results.png")
    a = p.parse_args(argv)
    summary = run_benchmarks(a.model_dir, a.tokenizer, a.tasks, a.limit, a.data_dir, a.out, a.batch_size,
                             num_fewshot=a.num_fewshot, seed=a.seed, chat_template=a.chat_template,
                             cache_dir=a.cache_dir, device=a.device)
    if a.plot:
        plot_results(summary, a.out / "results.png")
    print(summary["table_md"])
    print(f"{summary['seconds']} s; wrote {a.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
