"""Render a `RunReport` (`tasks/report.py`): Markdown with charts beside it, and one HTML file with the same text
and the charts embedded as base64 PNG, so the page opens anywhere with nothing else (no external src or href)."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from tasks.report import RunReport

STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
         "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem;"
         "text-align:right}th:first-child,td:first-child{text-align:left}img{max-width:100%}"
         "code{background:#f4f4f4;padding:0 .2rem}")


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of records."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render_markdown(r: RunReport, images: dict[str, str]) -> str:
    """The report as Markdown; `images` maps a chart's name (loss, post_training, eval) to its relative path."""
    out = [f"# Run report: {r.name}", "",
           f"MLflow run `{r.run_id}` ({r.status}), started {r.started}; "
           + ", ".join(f"{k} `{v}`" for k, v in r.tags.items()), ""]
    t = r.data_totals
    out += ["## Data funnel", "", f"{fmt(t.get('records_in', 0))} records in, {fmt(t.get('docs_out', 0))} documents "
            f"out ({fmt(t.get('chars_out', 0))} characters) in {fmt(t.get('seconds', 0.0))} s.", "",
            table(r.funnel, ["step", "in", "kept", "dropped"]), ""]
    out += ["## Tokenizer", "", table([{"stat": k, "value": v} for k, v in r.tokenizer.items()], ["stat", "value"]), ""]
    m = r.model
    if m:
        out += ["## Model size and compute", "",
                f"{m['arch']}, {m['n_layer']} layers, {m['n_head']} heads, width {m['n_embd']}, context "
                f"{m['block_size']}, vocabulary {fmt(m['vocab_size'])}.", "",
                table([{"quantity": k, "value": m[k]} for k in (
                    "params", "params_non_embedding", "tokens", "flops_per_token", "train_flops", "tokens_per_s", "mfu",
                    "final_train_loss", "final_val_loss", "val_bpb") if m.get(k) is not None], ["quantity", "value"]),
                "", "FLOPs per token = 6 x non-embedding parameters + 12 x layers x width x context (training, "
                "forward and backward); train FLOPs = FLOPs per token x tokens.", ""]
    if "loss" in images:
        out += ["## Loss curves", "", f"![loss curves]({images['loss']})", ""]
    if "post_training" in images:
        out += ["## Post-training curves", "", f"![post-training curves]({images['post_training']})", ""]
    out += ["## Evaluation", "", r.eval_table.strip() or "(no results.md on the run)", ""]
    if "eval" in images:
        out += [f"![eval chart]({images['eval']})", ""]
    if r.promotion:
        out += ["### Registry gate", "", r.promotion, ""]
    if r.contamination:
        out += ["### Contamination", "", r.contamination, ""]
    out += ["## Stage timings and cache hits", "", table(r.timings, ["stage", "seconds", "cached"]), ""]
    env = r.environment or {"recorded": "no (environment.json missing on the run)"}
    out += ["## Environment", "", table([{"item": k, "value": ", ".join(v) if isinstance(v, list) else v}
                                         for k, v in env.items()], ["item", "value"]), ""]
    return "\n".join(out)


def charts(r: RunReport, out_dir: Path) -> dict[str, Path]:
    """The loss curves of every training stage and the post-training curves, as PNGs in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    for name, series, ylabel in (("loss", r.losses, "loss"), ("post_training", r.post_curves, "")):
        if not series:
            continue
        fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series), 2.8), squeeze=False)
        for ax, (title, data) in zip(axes[0], series.items(), strict=True):
            for label, points in (data.items() if isinstance(data, dict) else [(title, data)]):
                if points:
                    steps, values = zip(*[(p[0], p[1]) for p in points], strict=True)
                    ax.plot(steps, values, "o-" if label == "val" else "-", label=label, markersize=3)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
            if isinstance(data, dict):
                ax.legend(fontsize=7)
        fig.tight_layout()
        made[name] = out_dir / f"{name}.png"
        fig.savefig(made[name], dpi=80)
        plt.close(fig)
    return made


def render_html(markdown_text: str, base: Path, title: str) -> str:
    """The Markdown as one HTML page; each image (a path relative to `base`) inlined as a base64 data URI."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])

    def inline(m: re.Match) -> str:
        data = base64.b64encode((base / m.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', inline, body)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title><style>{STYLE}</style>"
            f"</head><body>\n{body}\n</body></html>\n")


def write_report(r: RunReport, out_dir: Path, eval_chart: Path | None = None) -> tuple[Path, Path]:
    """report.md (charts in `images/`) and the self-contained report.html in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = charts(r, out_dir / "images")
    if eval_chart is not None and eval_chart.exists():
        made["eval"] = out_dir / "images" / "eval.png"
        made["eval"].write_bytes(eval_chart.read_bytes())
    text = render_markdown(r, {k: p.relative_to(out_dir).as_posix() for k, p in made.items()})
    md, html = out_dir / "report.md", out_dir / "report.html"
    md.write_text(text)
    html.write_text(render_html(text, out_dir, f"Run report: {r.name}"))
    return md, html
