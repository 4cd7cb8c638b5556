"""The pipeline flow: data -> tokenizer -> pretrain -> SFT -> align (DPO) -> eval -> registry.

One parent MLflow run per pipeline run (named `<preset>-<gitsha7>`), a nested run per stage, the wall time
of every stage as `time/<stage>_s` metrics on the parent, the model registered as `gpt-<preset>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.presets import PresetName, resolve
from flows.stages import (align_task, data_task, eval_task, pretrain_task, register_task, sft_task, timed,
                          tokenizer_task)
from infra.env import runs_dir
from tasks import tracking
from tasks.stage import output


@flow(name="llm-pipeline", flow_run_name="pipeline-{preset}", log_prints=True)
def llm_pipeline_flow(preset: PresetName = "tiny", overrides: dict[str, Any] | None = None,
                      workdir: str | None = None) -> dict[str, Any]:
    """Run every stage of the pipeline for a preset; `overrides` are dotted keys (`pretrain.lr: 3e-4`)."""
    cfg = resolve(preset, overrides or {})
    root = str(Path(workdir).resolve() if workdir else runs_dir())
    sha = tracking.git_sha()[:7]
    with tracking.pipeline_run(f"{preset}-{sha}", cfg.model_dump(mode="json"), {"preset": preset}) as parent:
        times: dict[str, float] = {}
        m: dict[str, dict] = {}
        m["data"], times["data"] = timed(data_task, cfg.data, root, parent)
        m["tokenizer"], times["tokenizer"] = timed(tokenizer_task, cfg.tokenizer, str(output(m["data"], "documents")), root, parent)
        tok = str(output(m["tokenizer"], "tokenizer"))
        m["pretrain"], times["pretrain"] = timed(pretrain_task, cfg.pretrain, str(output(m["tokenizer"], "shards")), root, parent)
        m["sft"], times["sft"] = timed(sft_task, cfg.sft, str(output(m["pretrain"], "model")), tok, root, parent)
        m["align"], times["align"] = timed(align_task, cfg.align, str(output(m["sft"], "model")), tok, root, parent)
        final_model = str(output(m["align"], "model"))
        m["eval"], times["eval"] = timed(eval_task, cfg.eval, final_model, tok, root, parent)
        tags = {"preset": preset, "git_sha": sha, "pipeline_run_id": parent,
                **{f"stage_key.{s}": mm["key"] for s, mm in m.items()},
                **{k.removeprefix("eval/"): f"{v:.4f}" for k, v in m["eval"]["metrics"].items() if "stderr" not in k}}
        registered, times["register"] = timed(register_task, final_model, tok, cfg.registry.model_name,
                                              list(cfg.registry.aliases), tags, parent)
        times["total"] = sum(times.values())
        tracking.log_metrics(parent, {f"time/{k}_s": v for k, v in times.items()})
        tracking.log_metrics(parent, {k: v for s in ("pretrain", "sft", "align") for k, v in m[s]["metrics"].items()})
        tracking.log_metrics(parent, m["eval"]["metrics"])
        table = Path(output(m["eval"], "table")).read_text()
        tracking.log_artifact(parent, output(m["eval"], "table"))
    return {
        "run_id": parent,
        "tracking_uri": tracking.tracking_uri(),
        "experiment": tracking.EXPERIMENT,
        "model": registered,
        "times": times,
        "cached": {s: mm.get("cached", False) for s, mm in m.items()},
        "stage_dirs": {s: mm["dir"] for s, mm in m.items()},
        "eval_table": table,
    }
