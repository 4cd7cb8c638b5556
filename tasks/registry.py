"""Registry stage: the final model as a version of the registered model `gpt-<preset>`, with its aliases and tags.

The MLflow calls are `tasks.tracking.register_model`'s (the only MLflow importer); what the version says about
itself (stage keys, eval scores, the pipeline run) is decided here, without MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from tasks.refs import EvalReport, Ref


class RegistryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str | None = Field(
        None, description="Registered model name in the MLflow registry; None: gpt-<preset> (one per preset)."
    )
    aliases: list[str] = Field(default_factory=lambda: ["candidate"], description="Aliases set on the new version.")


def version_tags(preset: str, git_sha: str, pipeline_run_id: str, refs: Mapping[str, Ref],
                 report: EvalReport) -> dict[str, str]:
    """Tags of a new model version: where it came from (preset, commit, run, every stage's key) and its scores."""
    return {
        "preset": preset,
        "git_sha": git_sha,
        "pipeline_run_id": pipeline_run_id,
        **{f"stage_key.{stage}": ref.key for stage, ref in refs.items()},
        **{name: f"{value:.4f}" for name, value in report.scores().items()},
    }
