"""The pipeline as prefect.yaml deploys it: one flow per preset whose typed `config` parameter defaults to that
preset's whole config, so the Prefect UI's run form shows every stage's options with the preset's values and
each field's description, and refuses a value of the wrong type or an unknown key before the run starts
(`enforce_parameter_schema`). All three are the `llm-pipeline` flow; each runs `llm_pipeline_flow`'s body in
its own flow run. From Python or the CLI, call `llm_pipeline_flow(preset, overrides)` instead.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import PipelineConfig
from flows.pipeline import llm_pipeline_flow
from flows.presets import gpt2_124m, small, tiny

# each preset's config, built once at import: the default of its flow's `config` (the form's pre-filled values)
TINY, SMALL, GPT2_124M = tiny(), small(), gpt2_124m()


@flow(name="llm-pipeline", flow_run_name="pipeline-tiny", log_prints=True)
def tiny_pipeline_flow(config: PipelineConfig = TINY, workdir: str | None = None) -> dict[str, Any]:
    """The whole pipeline on the tiny preset (minutes on a laptop).

    Args:
        config: Every stage's config, the tiny preset's values by default.
        workdir: Folder of the stage outputs (default: the workspace's runs folder).
    """
    return llm_pipeline_flow.fn(config=config, workdir=workdir)


@flow(name="llm-pipeline", flow_run_name="pipeline-small", log_prints=True)
def small_pipeline_flow(config: PipelineConfig = SMALL, workdir: str | None = None) -> dict[str, Any]:
    """The whole pipeline on the small preset (~14M parameters, a workstation).

    Args:
        config: Every stage's config, the small preset's values by default.
        workdir: Folder of the stage outputs (default: the workspace's runs folder).
    """
    return llm_pipeline_flow.fn(config=config, workdir=workdir)


@flow(name="llm-pipeline", flow_run_name="pipeline-gpt2-124m", log_prints=True)
def gpt2_124m_pipeline_flow(config: PipelineConfig = GPT2_124M, workdir: str | None = None) -> dict[str, Any]:
    """The whole pipeline on the gpt2-124m preset (GPT-2 small on a GPU Ray cluster: set RAY_ADDRESS).

    Args:
        config: Every stage's config, the gpt2-124m preset's values by default.
        workdir: Folder of the stage outputs (default: the workspace's runs folder).
    """
    return llm_pipeline_flow.fn(config=config, workdir=workdir)
