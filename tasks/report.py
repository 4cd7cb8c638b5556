"""The run report: one Markdown and one self-contained HTML page per pipeline run, built from what the run recorded
in MLflow (the parent run, each stage's nested run and its `manifest.json`, `history.json`, metric histories,
`results.md`, `environment.json`), not from the flow's memory, so it can be rebuilt for any past run.

    report = collect(run_id)                  # reads MLflow (through tasks/tracking.py)
    md, html = write_report(report, out_dir)  # report.md, report.html (images embedded), images/*.png

Run alone: `gptflow report RUN_ID [--out DIR]`.
"""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.gpt import GPTConfig
from models.plan import flops_per_token, param_count
from tasks import tracking

LOSS_STAGES = ("pretrain", "sft", "dpo", "reward", "grpo")
# Post-training curves from each stage's history.json (logged on its run, also when the stage was reused, which
# its MLflow metric histories are not): PPO's reward and KL per rollout, DPO's margin and reward accuracy, GRPO's
# accuracy, reward and KL of the sampled groups.
POST_CURVES = {"ppo": ("rollout", {"ppo/reward": "reward", "ppo/kl": "kl"}),
               "dpo": ("dpo", {"dpo/margin": 3, "dpo/reward_acc": 4}),  # rows [step, chosen, rejected, margin, acc]
               "grpo": ("grpo", {"grpo/accuracy": "grpo/accuracy", "grpo/reward": "grpo/reward", "grpo/kl": "grpo/kl"})}
FILES = {"": ("results.md", "promotion.md", "contamination.md", "environment.json"), "data": ("manifest.json",),
         "tokenizer": ("manifest.json",), "pretrain": ("config.json", "history.json"),
         **{s: ("history.json",) for s in (*LOSS_STAGES[1:], "ppo")}}
LIBRARIES = ("torch", "ray", "prefect", "mlflow", "datatrove", "lm_eval", "transformers", "tokenizers")


@dataclass
class RunReport:
    """Everything the report shows, as plain values."""

    run_id: str
    name: str
    status: str
    started: str
    tags: dict[str, str]
    funnel: list[dict[str, Any]]              # [{step, in, kept, dropped}], in pipeline order
    data_totals: dict[str, Any]
    tokenizer: dict[str, Any]                 # counts and metrics of the tokenizer stage
    model: dict[str, Any]                     # config, params, tokens, FLOPs, MFU, throughput
    losses: dict[str, dict[str, list]]        # {stage: {"train": [[step, loss]], "val": [...]}}
    post_curves: dict[str, list]              # {"ppo/reward": [[step, value]], ...}
    eval_table: str                           # results.md of the parent run, as logged
    eval_rows: list[dict[str, Any]]           # the same table as records (for a table artifact)
    promotion: str
    contamination: str
    timings: list[dict[str, Any]]             # [{stage, seconds, cached}]
    environment: dict[str, Any] = field(default_factory=dict)


def collect(run_id: str) -> RunReport:
    """The report of pipeline run `run_id`, from its MLflow records."""
    rec = tracking.run_records(run_id, FILES)
    parent, children = rec["parent"], {c["name"]: c for c in rec["children"]}
    histories = {n: json.loads(c["files"]["history.json"]) for n, c in children.items() if "history.json" in c["files"]}
    manifests = {n: json.loads(c["files"]["manifest.json"]) for n, c in children.items() if "manifest.json" in c["files"]}
    files = parent["files"]
    table = files.get("results.md", "")
    return RunReport(
        run_id=run_id, name=parent["name"], status=parent["status"],
        started=datetime.fromtimestamp(parent["start_ms"] / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC"),
        tags={k: v for k, v in parent["tags"].items() if k in ("preset", "git_sha", "prefect_flow_run_id")},
        funnel=funnel(manifests.get("data", {}).get("counts", {})),
        data_totals=manifests.get("data", {}).get("counts", {}).get("totals", {}),
        tokenizer=tokenizer_stats(manifests.get("tokenizer", {})),
        model=model_stats(children.get("pretrain")),
        losses={s: {k: histories[s].get(k, []) for k in ("train", "val")} for s in LOSS_STAGES if s in histories},
        post_curves=post_curves(histories),
        eval_table=table, eval_rows=table_rows(table),
        promotion=files.get("promotion.md", "").strip(), contamination=files.get("contamination.md", "").strip(),
        timings=timings(parent["metrics"], children),
        environment=json.loads(files["environment.json"]) if "environment.json" in files else {},
    )


def funnel(counts: dict[str, Any]) -> list[dict[str, Any]]:
    """The data stage's document funnel: each step that reads, filters or dedups, with documents in and kept."""
    return [{"step": name, "in": s["in"], "kept": s["kept"], "dropped": s.get("dropped", s["in"] - s["kept"])}
            for name, s in counts.get("steps", {}).items() if isinstance(s, dict) and "in" in s and "kept" in s]


def post_curves(histories: dict[str, dict[str, Any]]) -> dict[str, list]:
    """{"ppo/reward": [[step, value], ...], ...} for each post-training stage of the run with two points or more."""
    out = {}
    for stage, (key, columns) in POST_CURVES.items():
        rows = histories.get(stage, {}).get(key) or []
        for name, col in columns.items():
            points = [[r["step"] if isinstance(r, dict) else r[0], r[col]] for r in rows]
            if len(points) > 1:
                out[name] = points
    return out


def tokenizer_stats(manifest: dict[str, Any]) -> dict[str, Any]:
    c = manifest.get("counts", {})
    keep = ("vocab_size", "train_docs", "val_docs", "train_tokens", "val_tokens", "train_bytes", "val_bytes")
    return {**{k: c[k] for k in keep if k in c}, **{k.split("/")[-1]: v for k, v in manifest.get("metrics", {}).items()}}


def model_stats(pretrain: dict[str, Any] | None) -> dict[str, Any]:
    """Size and compute of the pretrained model: parameters and FLOPs per token from its config (models/plan.py),
    tokens, throughput and MFU as the pretraining run logged them; total FLOPs = FLOPs per token x tokens."""
    if not pretrain or "config.json" not in pretrain["files"]:
        return {}
    cfg = GPTConfig.model_validate(json.loads(pretrain["files"]["config.json"]))
    m = pretrain["metrics"]
    tokens = m.get("pretrain/tokens", 0.0)
    return {"arch": cfg.arch, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
            "block_size": cfg.block_size, "vocab_size": cfg.vocab_size, "params": param_count(cfg),
            "params_non_embedding": param_count(cfg, non_embedding=True), "flops_per_token": flops_per_token(cfg),
            "tokens": int(tokens), "train_flops": float(flops_per_token(cfg) * tokens),
            "tokens_per_s": m.get("pretrain/tokens_per_s"), "mfu": m.get("pretrain/mfu"),
            "final_train_loss": m.get("pretrain/final_train_loss"), "final_val_loss": m.get("pretrain/final_val_loss"),
            "val_bpb": m.get("pretrain/val_bpb")}


def timings(metrics: dict[str, float], children: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Stage wall times (the parent's `time/<stage>_s`) and whether the stage reused a finished folder (the stage
    run's `cached` tag; eval_base's run is `eval-base`)."""
    rows = []
    for key, seconds in metrics.items():
        if (m := re.fullmatch(r"time/(.+)_s", key)) is None:
            continue
        run = children.get(m.group(1).replace("_", "-"), children.get(m.group(1), {}))
        rows.append({"stage": m.group(1), "seconds": round(seconds, 1),
                     "cached": run.get("tags", {}).get("cached", "") == "true"})
    return sorted(rows, key=lambda r: r["stage"] == "total")


def table_rows(markdown: str) -> list[dict[str, str]]:
    """A Markdown table's rows as records keyed by its header cells (bold, marking the best, dropped)."""
    lines = [ln.strip().strip("|").split("|") for ln in markdown.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 3:
        return []
    header = [h.strip() or "metric" for h in lines[0]]
    return [dict(zip(header, (c.strip().strip("*") for c in row), strict=False)) for row in lines[2:]]


def environment() -> dict[str, Any]:
    """This machine and process: Python and library versions, CPU, cores, memory, GPUs (recorded by the run)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    libs = {}
    for name in LIBRARIES:
        try:
            libs[name] = version(name.replace("_", "-") if name == "lm_eval" else name)
        except PackageNotFoundError:
            libs[name] = "not installed"
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"python": platform.python_version(), **libs, "os": platform.platform(), "cpu": cpu,
            "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "gpus": gpus or ["none"]}
