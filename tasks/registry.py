"""Registry stage: every alignment branch as a version of the registered model `gpt-<preset>`, and the eval gate
that decides whether this run's best branch becomes the `champion`.

The MLflow calls are `tasks.tracking`'s (the only MLflow importer); what a version says about itself (stage keys,
eval scores with their standard errors, the gate's decision) is decided here, without MLflow.

The gate: this run's best branch (by the first gate metric) gets the alias `candidate`. It takes `champion` when
there is no champion yet, or when it beats the champion on every gate metric by more than the standard error of
the difference, sqrt(se_candidate^2 + se_champion^2). The champion's scores are read back from its version tags
when they come from the same evaluation setup (tasks, limit, few-shot, benchmark files: `eval_setup`); when they
do not, the pipeline evaluates the champion again under this run's setup first (`flows/pipeline.py`), and scores
of two setups are never compared.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.refs import EvalReport, Ref

LOWER_IS_BETTER = ("perplexity", "bits_per_byte")
MEAN_ACC = "mean/acc"


class RegistryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str | None = Field(
        None, description="Registered model name in the MLflow registry; None: gpt-<preset> (one per preset)."
    )
    aliases: list[str] = Field(default_factory=lambda: ["candidate"],
                               description="Aliases set on this run's best branch (the one the gate judges).")
    gate_metrics: list[str] = Field(
        default_factory=lambda: [MEAN_ACC],
        description="Scores the candidate must beat the champion on, by more than their standard error: "
                    "`<task>/<metric>` (e.g. `hellaswag/acc_norm`) or `mean/acc` (unweighted mean acc of the tasks).")
    champion_alias: str = Field("champion", description="The alias the gate moves.")


class Score(BaseModel):
    model_config = ConfigDict(frozen=True)

    value: float
    stderr: float | None = None


class GateRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    metric: str
    candidate: Score
    champion: Score | None = None
    margin: float | None = Field(None, description="sqrt(se_cand^2 + se_champ^2): what the difference must exceed.")
    beats: bool = True


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True)

    promote: bool
    outcome: str = Field(description="first | promoted | kept | already-champion | not-comparable")
    reason: str
    champion_version: int | None = None
    rows: list[GateRow] = Field(default_factory=list)
    method: str = Field("", description="The branch the gate judged (set by the pipeline).")


# ---------------------------------------------------------------- scores with their standard errors


def report_scores(report: EvalReport) -> dict[str, Score]:
    """`<task>/<metric>` -> Score from the eval stage's results.json, plus `mean/acc` (mean of the tasks' acc,
    stderr sqrt(sum se_i^2) / k, the tasks being independent samples)."""
    summary = json.loads(report.file("results").read_text())
    return scores_of(summary["results"], summary.get("stderr", {}))


def scores_of(results: Mapping[str, Mapping[str, float]],
              stderr: Mapping[str, Mapping[str, float | None]]) -> dict[str, Score]:
    out = {}
    for task, metrics in results.items():
        for metric, value in metrics.items():
            se = stderr.get(task, {}).get(metric)
            out[f"{task}/{metric}"] = Score(value=value, stderr=se if _finite(se) else None)
    accs = [s for name, s in out.items() if name.endswith("/acc") and not name.startswith("core/")]
    if accs:
        ses = [s.stderr or 0.0 for s in accs]
        out[MEAN_ACC] = Score(value=sum(s.value for s in accs) / len(accs),
                              stderr=math.sqrt(sum(e * e for e in ses)) / len(accs))
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def eval_setup(report: EvalReport) -> str:
    """What makes two runs' scores comparable: the eval stage's parameters and the benchmark files' hash, read
    from the report's manifest."""
    manifest = json.loads(Path(report.manifest).read_text())
    data = manifest["inputs"]["benchmarks"]["sha256"]
    params = {k: v for k, v in manifest["params"].items() if k not in ("batch_size", "cache_dir")}  # not scores
    blob = json.dumps({"params": params, "benchmarks": data}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- tags written and read back


def version_tags(preset: str, git_sha: str, pipeline_run_id: str, refs: Mapping[str, Ref],
                 report: EvalReport, setup: str, config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Tags of a new version: where it came from (preset, commit, run, every stage's key, the data manifest's
    and the tokenizer's hashes, the resolved config and its hash) and its scores with their standard errors.
    The registry adds the model's content hash (`model_sha256`), which it looks up to reuse a version."""
    scores = report_scores(report)
    tags = {
        "preset": preset,
        "git_sha": git_sha,
        "pipeline_run_id": pipeline_run_id,
        **{f"stage_key.{stage}": ref.key for stage, ref in refs.items()},
        "eval_setup": setup,
        **score_tags(scores),
    }
    if "data" in refs and refs["data"].manifest:
        tags["data_manifest_sha256"] = hashlib.sha256(Path(refs["data"].manifest).read_bytes()).hexdigest()
        tags["corpus_sha256"] = refs["data"].sha256
    if "tokenizer" in refs:
        tags["tokenizer_sha256"] = refs["tokenizer"].sha256
    if config is not None:
        blob = json.dumps(config, sort_keys=True, default=str)
        tags |= {"config_sha256": hashlib.sha256(blob.encode()).hexdigest(), "config_json": blob}
    return tags


def score_tags(scores: Mapping[str, Score]) -> dict[str, str]:
    tags = {}
    for name, s in scores.items():
        tags[f"score.{name}"] = repr(s.value)
        if s.stderr is not None:
            tags[f"stderr.{name}"] = repr(s.stderr)
    return tags


def scores_from_tags(tags: Mapping[str, str]) -> dict[str, Score]:
    """The inverse of `score_tags` (MLflow keeps the `/` of `task/metric` in tag keys)."""
    out = {}
    for key, value in tags.items():
        if key.startswith("score."):
            name = key.removeprefix("score.")
            se = tags.get(f"stderr.{name}")
            out[name] = Score(value=float(value), stderr=float(se) if se is not None else None)
    return out


# ---------------------------------------------------------------- the gate


def decide(candidate: Mapping[str, Score], setup: str, champion: Mapping[str, str] | None,
           champion_version: int | None, candidate_version: int, metrics: list[str],
           champion_scores: Mapping[str, Score] | None = None) -> Decision:
    """Promote `candidate` over the champion (its version tags) or keep the champion; see the module docstring.
    `champion_scores`: the champion scored again under this run's `setup` (when its tags are from another)."""
    missing = [m for m in metrics if m not in candidate]
    if missing:
        raise ValueError(f"registry.gate_metrics: {missing} not among the eval scores {sorted(candidate)}")
    if champion is None:
        rows = [GateRow(metric=m, candidate=candidate[m]) for m in metrics]
        return Decision(promote=True, outcome="first", reason="no champion yet: the first version becomes champion",
                        rows=rows)
    if champion_version == candidate_version:
        return Decision(promote=False, outcome="already-champion", champion_version=champion_version,
                        reason=f"version {candidate_version} is already the champion")
    if champion_scores is None and champion.get("eval_setup") != setup:
        return Decision(promote=False, outcome="not-comparable", champion_version=champion_version,
                        reason=f"the champion (version {champion_version}) was scored on another evaluation setup "
                               f"({champion.get('eval_setup')} vs {setup}): champion kept")
    theirs = dict(champion_scores) if champion_scores is not None else scores_from_tags(champion)
    rows = []
    for m in metrics:
        if m not in theirs:
            return Decision(promote=False, outcome="not-comparable", champion_version=champion_version,
                            reason=f"the champion (version {champion_version}) has no {m} score: champion kept")
        ours, old = candidate[m], theirs[m]
        margin = math.hypot(ours.stderr or 0.0, old.stderr or 0.0)
        sign = -1.0 if any(s in m for s in LOWER_IS_BETTER) else 1.0
        rows.append(GateRow(metric=m, candidate=ours, champion=old, margin=margin,
                            beats=sign * (ours.value - old.value) > margin))
    if all(r.beats for r in rows):
        return Decision(promote=True, outcome="promoted", champion_version=champion_version, rows=rows,
                        reason=f"beats version {champion_version} on {', '.join(metrics)} by more than the stderr")
    lost = [r.metric for r in rows if not r.beats]
    return Decision(promote=False, outcome="kept", champion_version=champion_version, rows=rows,
                    reason=f"does not beat version {champion_version} by more than the stderr on {', '.join(lost)}")


def decision_tags(decision: Decision) -> dict[str, str]:
    tags = {"gate.outcome": decision.outcome, "gate.reason": decision.reason}
    if decision.champion_version is not None:
        tags["gate.champion_version"] = str(decision.champion_version)
    for r in decision.rows:
        if r.champion is not None:
            tags[f"gate.{r.metric}.champion"] = repr(r.champion.value)
            tags[f"gate.{r.metric}.margin"] = repr(r.margin)
    return tags


def score_cell(s: Score | None) -> str:
    """A score as a table cell: `value ± stderr`."""
    if s is None:
        return ""
    return f"{s.value:.4f}" + (f" ± {s.stderr:.4f}" if s.stderr is not None else "")


def describe(name: str, version: int, method: str, decision: Decision | None, card: str) -> str:
    """The model version's description (Markdown): the gate's decision on top of the model card
    (`tasks.model_card.model_card`: data, size, compute, scores, contamination, intended use)."""
    lines = [f"# {name} version {version}", "", f"Alignment branch: `{method}`.", ""]
    if decision is not None:
        lines += [f"**Gate: {decision.outcome}.** {decision.reason}.", ""]
        if decision.rows:
            lines += ["| gate metric | this version | champion | margin | beats |", "|---|---:|---:|---:|---|"]
            lines += [f"| {r.metric} | {score_cell(r.candidate)} | {score_cell(r.champion)} | "
                      f"{'' if r.margin is None else f'{r.margin:.4f}'} | {'yes' if r.beats else 'no'} |"
                      for r in decision.rows]
            lines.append("")
    body = card.split("\n", 1)[1] if card.startswith("# ") else card  # the card's own title gives way to ours
    return "\n".join(lines) + body.lstrip("\n")


def best_branch(scores: Mapping[str, Mapping[str, Score]], metric: str) -> str:
    """The branch with the best `metric` (the first on a tie, in the pipeline's order)."""
    sign = -1.0 if any(s in metric for s in LOWER_IS_BETTER) else 1.0
    return max(scores, key=lambda b: sign * scores[b][metric].value if metric in scores[b] else -math.inf)
