"""Evaluation stage: lm-eval benchmarks (HellaSwag, ARC, PIQA, WinoGrande, BoolQ, OpenBookQA, LAMBADA,
WikiText, and the generative arithmetic task scored by code) on the model, from local files. The harness itself
lives in `eval/`.

In: a `ModelRef` (a `model/` folder) and the `TokenizerRef`. Out: an `EvalReport` to `results.json`, with
`results.md` (the table), `results.png` and `samples/<task>.jsonl` (per-document scores).
Run alone: `gptflow eval --model DIR --tokenizer DIR`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from eval.benchmarks import GENERATIVE_TASKS, TASKS
from infra.env import resolve_path
from tasks.refs import EvalReport, ModelRef, TokenizerRef


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[str] = Field(default_factory=lambda: list(TASKS + GENERATIVE_TASKS),
                             description="Benchmarks to run: the nine log-likelihood tasks and the arithmetic one.")
    limit: int | None = Field(None, ge=1, description="Documents per task (None: all in the data folder).")
    data_dir: str = Field("data/benchmarks", description="Folder of prepared benchmark JSONL files (`python -m eval.prepare` makes the full sets).")
    batch_size: int = Field(16, ge=1, description="Requests per forward pass (and prompts decoded together).")
    num_fewshot: int = Field(0, ge=0, description="Examples from each task's own few-shot split before each question "
                             "(0: zero-shot). Drawn with `seed`, never the evaluated document itself.")
    seed: int = Field(1234, description="Seed of the few-shot sampler and lm-eval's other seeds (lm-eval's default).")
    chat_template: bool | None = Field(None, description="Render each prompt in the chat template the SFT stage "
                                       "trained on (lm-eval's apply_chat_template; few-shot examples as turns). None: "
                                       "the pipeline uses it for its chat models (SFT and every branch), not for the "
                                       "base model; `gptflow eval` does not.")
    cache_dir: str | None = Field(None, description="lm-eval's request cache folder; its file is named by the model's "
                                  "content hash, so one model's answers are never served to another. None: no cache.")


def evaluate_model(cfg: EvalConfig, model: ModelRef, tokenizer: TokenizerRef, out_dir: Path) -> EvalReport:
    """Core of the stage: run the benchmarks on `cfg.data_dir` (repo-relative or absolute), write the results,
    their table and chart into `out_dir`.

    Returns the report: metrics `eval/<task>/<metric>`, counts of tasks and of documents per task.
    """
    from eval.harness import plot_results, run_benchmarks

    report = run_benchmarks(Path(model.path), tokenizer.tokenizer_json, list(cfg.tasks), cfg.limit,
                            resolve_path(cfg.data_dir), out_dir, batch_size=cfg.batch_size,
                            num_fewshot=cfg.num_fewshot, seed=cfg.seed, chat_template=bool(cfg.chat_template),
                            cache_dir=None if cfg.cache_dir is None else resolve_path(cfg.cache_dir))
    plot_results(report["results"], out_dir / "results.png")
    metrics = {f"eval/{task}/{name}": value for task, m in report["results"].items() for name, value in m.items()
               if isinstance(value, (int, float))}
    counts = {"tasks": len(report["results"]), **{f"docs_{t}": n for t, n in report.get("samples_count", {}).items()}}
    files = {"results": out_dir / "results.json", "table": out_dir / "results.md", "plot": out_dir / "results.png",
             "samples": out_dir / "samples"}  # a folder: <task>.jsonl per task (eval/README.md)
    return EvalReport(path=str(files["results"]), counts=counts, metrics=metrics,
                      files={name: str(p) for name, p in files.items()}, artifacts=["table", "results", "plot", "samples"])


def compare_reports(reports: dict[str, EvalReport]) -> str:
    """One Markdown table of every model's headline scores, a column per model (the branches of the pipeline:
    the SFT model and each alignment method), a row per benchmark metric; the best of a row in bold (none when
    every model scores the same)."""
    names = list(reports)
    rows = sorted({k for r in reports.values() for k in r.scores()})
    lower_better = ("perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity")
    lines = ["| benchmark | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in rows:
        values = [reports[n].scores().get(row) for n in names]
        known = [v for v in values if v is not None]
        best = (min if any(s in row for s in lower_better) else max)(known) if len(set(known)) > 1 else None
        cells = ["" if v is None else (f"**{v:.4f}**" if v == best else f"{v:.4f}") for v in values]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def clean_table(reports: dict[str, EvalReport], clean: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: each task's acc on all its items and, in brackets, on its clean subset (`eval.decontam.
    clean_scores`), a column per model; the clean item count beside the task."""
    names = list(reports)
    lines = ["| task (clean items) | " + " | ".join(f"{n}: acc (clean)" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for task in dict.fromkeys(t for s in clean.values() for t in s):
        cells = []
        for n in names:
            full, part = reports[n].scores().get(f"{task}/acc"), clean[n].get(task, {})
            cells.append("" if full is None or "acc" not in part else f"{full:.4f} ({part['acc']:.4f})")
        count = next(int(s[task]["n"]) for s in clean.values() if task in s)
        if any(cells):
            lines.append(f"| {task} ({count}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_chart(reports: dict[str, EvalReport], png: Path) -> Path:
    """The comparison as a PNG: each benchmark's acc, one bar per model, chance dashed; perplexities (log scale)
    beside it. The same numbers as `compare_reports`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.harness import mark_chance

    names = list(reports)
    scores = {n: r.scores() for n, r in reports.items()}
    tasks = [t for t in TASKS if any(f"{t}/acc" in s for s in scores.values())]
    ppl = sorted({k for s in scores.values() for k in s if k.endswith("perplexity")})
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 1.2]})
    width = 0.8 / max(1, len(names))
    for j, n in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, [scores[n].get(f"{t}/acc", 0.0) for t in tasks], width, label=n)
    mark_chance(ax, tasks)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("acc")
    ax.set_title("accuracy per model (dashed: chance)")
    ax.legend(fontsize=8, ncol=min(len(names), 5))
    for j, n in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(ppl))]
        ax2.bar(xs, [scores[n].get(k, 0.0) for k in ppl], width, label=n)
    ax2.set_xticks(range(len(ppl)), [k.replace("/", "\n") for k in ppl], fontsize=8)
    ax2.set_yscale("log")
    ax2.set_title("perplexity (lower is better)")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
