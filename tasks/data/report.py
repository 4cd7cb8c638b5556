"""What people look at after the data stage: the realised mix of sources, a filter funnel chart and samples of
kept and dropped text; and the readers of its output (`iter_records`, `iter_documents`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from infra.jsonl import iter_jsonl_folder
from tasks.data.config import CRAWL_SOURCE


def iter_documents(out_dir: Path) -> Iterator[str]:
    """Yield the kept texts of a finished `build_corpus` run (the tokenizer stage consumes this)."""
    for record in iter_records(Path(out_dir) / "documents"):
        yield record["text"]


def iter_records(folder: Path) -> Iterator[dict]:
    """The JSON records of a folder of `*.jsonl.gz` shards (kept documents, or one filter's removals), in file order."""
    return iter_jsonl_folder(folder)


def realised_mix(text_sources: Mapping[str, float], documents: Path) -> dict[str, dict[str, float]]:
    """Realised proportions of the output per source, in documents and characters, beside each source's weight."""
    weights = {CRAWL_SOURCE: 1.0} | dict(text_sources)
    mix = {source: {"weight": w, "docs": 0, "chars": 0} for source, w in weights.items()}
    for record in iter_records(documents):
        source = record.get("metadata", {}).get("source", "unknown")
        entry = mix.setdefault(source, {"weight": 0.0, "docs": 0, "chars": 0})
        entry["docs"] += 1
        entry["chars"] += len(record["text"])
    n_docs = sum(m["docs"] for m in mix.values()) or 1
    n_chars = sum(m["chars"] for m in mix.values()) or 1
    for m in mix.values():
        m["doc_share"] = round(m["docs"] / n_docs, 4)
        m["char_share"] = round(m["chars"] / n_chars, 4)
    return mix


def funnel_chart(steps: dict[str, dict[str, Any]], png: Path) -> Path:
    """Documents kept after each filtering step (readers summed), with the drops labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first_stage = next(iter(steps)).split("/", 1)[0]  # later stages re-read what the previous one wrote
    first = {k: c for k, c in steps.items() if k.startswith(first_stage + "/")}
    lost = sum(c["in"] - c["kept"] for c in first.values() if c.get("kind") in ("reader", "extractor"))
    filters = [(k.split("/", 1)[-1], c) for k, c in steps.items() if c.get("kind") == "filter" and c.get("kept") is not None]
    rows = [("read + extract", filters[0][1]["in"] if filters else 0, lost)]
    rows += [(name, c["kept"], c.get("dropped", 0)) for name, c in filters]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    names = [r[0] for r in rows][::-1]
    kept = [r[1] for r in rows][::-1]
    ax.barh(names, kept, color="#4c72b0")
    for y, (_, k, d) in enumerate(rows[::-1]):
        ax.text(k, y, f" {k}" + (f"  (-{d})" if d else ""), va="center", fontsize=8)
    ax.set_xlabel("documents kept")
    ax.set_title("data stage funnel")
    ax.margins(x=0.2)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def write_samples(out_dir: Path, per_step: int = 3, chars: int = 600) -> Path:
    """`samples/kept.md` and `samples/dropped_<step>.md`: the first few documents, cut to `chars`."""
    samples = out_dir / "samples"
    samples.mkdir(exist_ok=True)
    groups = {"kept": out_dir / "documents"}
    if (out_dir / "removed").exists():
        groups.update({f"dropped_{d.name}": d for d in sorted((out_dir / "removed").iterdir()) if d.is_dir()})
    for name, folder in groups.items():
        parts = [f"# {name}\n"]
        for i, rec in zip(range(per_step), iter_jsonl_folder(folder, "**/*.jsonl*"), strict=False):
            meta = rec.get("metadata", {})
            url = meta.get("url") or meta.get("source") or ""
            parts.append(f"## {i + 1}. {url}\n\n```\n{rec.get('text', '')[:chars]}\n```\n")
        (samples / f"{name}.md").write_text("\n".join(parts))
    return samples
