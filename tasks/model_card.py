"""The model card of a registered version: what it was trained on, how big it is, what it cost, how it scores.

Built from the stage refs of the run that made the model (their manifests and counts), without MLflow: the
registry writes it as the version's description (under the gate's decision, `tasks.registry.describe`) and as
`README.md` into the version's Hugging Face folder. `lineage` lists the datasets behind a model (crawl files,
corpus, shards, SFT and preference data, benchmarks), each with its stage and digest, for MLflow's lineage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from infra.env import REPO_ROOT, workspace
from tasks.refs import Ref
from tasks.registry import Score, score_cell

# Stage inputs that are models, not data: lineage follows them through their own stage's inputs instead.
MODEL_INPUTS = ("model", "tokenizer", "reward")
TRAINING_STAGES = ("pretrain", "sft", "dpo", "reward", "ppo", "grpo")


class DatasetFacts(BaseModel):
    """One dataset behind a model: the stage that read it, its input name there, where it is, its content hash."""

    model_config = ConfigDict(frozen=True)

    stage: str
    name: str
    path: str
    sha256: str
    profile: dict[str, Any] = Field(default_factory=dict, description="What MLflow shows about it (docs, tokens).")


class CardFacts(BaseModel):
    """The numbers of a model card, read from the refs of the run that made the model."""

    model_config = ConfigDict(frozen=True)

    method: str = Field(description="The last training stage: the alignment branch (dpo, ppo, ...) or sft.")
    datasets: list[DatasetFacts] = Field(default_factory=list, description="Every dataset behind the model.")
    docs_kept: int | None = Field(None, description="Documents the data stage kept.")
    chars_kept: int | None = None
    vocab_size: int | None = None
    corpus_tokens: dict[str, int] = Field(default_factory=dict, description="Tokens of the shards, by split.")
    model: dict[str, Any] = Field(default_factory=dict, description="The model's config (models/config.py).")
    params: int | None = None
    tokens_trained: int | None = Field(None, description="Pretraining tokens.")
    flops: float | None = Field(None, description="Pretraining FLOPs: flops_per_token * tokens (models/plan.py).")
    mfu: float | None = None
    seconds: dict[str, float] = Field(default_factory=dict, description="Wall time of each training stage.")
    hardware: str = ""


def lineage(refs: Mapping[str, Ref]) -> list[DatasetFacts]:
    """The data inputs of every stage in `refs`, read from their manifests (the models they took are left out:
    their own stage is in `refs`)."""
    out = []
    for stage, ref in refs.items():
        if not ref.manifest or not Path(ref.manifest).is_file():
            continue
        inputs = json.loads(Path(ref.manifest).read_text()).get("inputs", {})
        out += [DatasetFacts(stage=stage, name=name, path=str(i["path"]), sha256=i.get("sha256", ""))
                for name, i in inputs.items() if name not in MODEL_INPUTS]
    return out


def card_facts(refs: Mapping[str, Ref], method: str, hardware: str = "") -> CardFacts:
    """The card's numbers from the run's refs (`data`, `tokenizer`, `pretrain`, `sft`, the branch, ...)."""
    from models.checkpoint import load_config
    from models.plan import flops_per_token, param_count

    totals = refs["data"].counts.get("totals", {}) if "data" in refs else {}
    tok = refs["tokenizer"].counts if "tokenizer" in refs else {}
    facts: dict[str, Any] = {"method": method, "datasets": lineage(refs), "docs_kept": totals.get("docs_out"),
                             "chars_kept": totals.get("chars_out"), "vocab_size": tok.get("vocab_size"),
                             "corpus_tokens": {s: tok[f"{s}_tokens"] for s in ("train", "val") if f"{s}_tokens" in tok},
                             "seconds": {s: r.seconds for s, r in refs.items() if s in TRAINING_STAGES},
                             "hardware": hardware or host_hardware()}
    if "pretrain" in refs:
        pre = refs["pretrain"]
        cfg = load_config(Path(pre.path))
        tokens = pre.counts.get("tokens")
        facts |= {"model": cfg.model_dump(mode="json"), "params": param_count(cfg), "tokens_trained": tokens,
                  "flops": float(flops_per_token(cfg) * tokens) if tokens else None,
                  "mfu": pre.metrics.get("pretrain/mfu")}
    return CardFacts(**facts)


def host_hardware() -> str:
    """This machine's accelerators (or its CPU cores): where the pipeline ran its stages."""
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{len(names)} x {names[0]}"
    return f"CPU, {os.cpu_count()} cores"


# ---------------------------------------------------------------- the Markdown


def model_card(name: str, facts: CardFacts | None, scores: Mapping[str, Score],
               contamination: Mapping[str, float] | None) -> str:
    """The card (Markdown): data, size, compute, scores, contamination, intended use.
    Without `facts` (a model registered outside a pipeline run), only the scores and contamination."""
    lines = [f"# {name}", ""]
    if facts is not None:
        lines += [f"Trained by the gptflow pipeline; last training stage: `{facts.method}`.", ""]
        lines += _data(facts) + _size(facts) + _compute(facts)
    lines += ["## Scores", "", "| score | value ± stderr |", "|---|---:|"]
    lines += [f"| {m} | {score_cell(s)} |" for m, s in sorted(scores.items())]
    lines.append("")
    if contamination:
        lines += ["## Contamination", "",
                  "Fraction of each benchmark's items with a 13-gram in this run's training data:", "",
                  "| task | contaminated |", "|---|---:|"]
        lines += [f"| {t} | {f:.2%} |" for t, f in contamination.items()]
        lines.append("")
    lines += ["## Intended use and limits", "",
              "A research and teaching model of the gptflow pipeline: for studying the pipeline, not for answers "
              "anyone relies on. It was trained on a small web crawl and small chat data, in English; it makes "
              "things up, repeats itself, and carries the biases of its web text. It was not red-teamed.", ""]
    return "\n".join(lines)


def _data(f: CardFacts) -> list[str]:
    lines = ["## Data", ""]
    if f.docs_kept is not None:
        lines.append(f"- Documents kept by the data stage: {f.docs_kept:,} ({f.chars_kept or 0:,} characters)")
    if f.corpus_tokens:
        split = ", ".join(f"{s} {n:,}" for s, n in f.corpus_tokens.items())
        lines.append(f"- Tokens (tokenizer vocabulary {f.vocab_size or 0:,}): {split}")
    lines += ["", "| stage | input | path | sha256 |", "|---|---|---|---|"]
    lines += [f"| {d.stage} | {d.name} | `{shown(d.path)}` | `{d.sha256[:16]}` |" for d in f.datasets]
    return lines + [""]


def shown(path: str) -> str:
    """A path as a reader of the card elsewhere can use it: a URL as it is; under the workspace as
    `$GPTFLOW_HOME/...`; under the repository relative to it (`data/crawl/...`); anything else in full."""
    if "://" in path:
        return path
    p = Path(path).resolve()
    for base, label in ((workspace(), "$GPTFLOW_HOME/"), (REPO_ROOT, "")):
        if p.is_relative_to(base.resolve()):
            return label + p.relative_to(base.resolve()).as_posix()
    return path


def _size(f: CardFacts) -> list[str]:
    if not f.model:
        return []
    m = f.model
    return ["## Size", "", f"- Parameters: {f.params:,}", f"- Architecture: {m.get('arch')}, {m.get('n_layer')} "
            f"layers, {m.get('n_head')} heads, width {m.get('n_embd')}", f"- Context: {m.get('block_size')} tokens",
            f"- Vocabulary: {m.get('vocab_size'):,}", ""]


def _compute(f: CardFacts) -> list[str]:
    lines = ["## Compute", ""]
    if f.tokens_trained:
        lines.append(f"- Pretraining tokens: {f.tokens_trained:,}; FLOPs: {f.flops:.3g}"
                     + (f"; MFU: {f.mfu:.2%}" if f.mfu is not None else ""))
    lines += [f"- Wall time of {s}: {sec:.1f} s" for s, sec in f.seconds.items()]
    lines.append(f"- Hardware: {f.hardware}")
    return lines + [""]
