"""prefect.yaml: every deployment's entrypoint loads, its parameters validate against the flow's typed
signature (the form the Prefect UI shows), and its schedules parse."""

from __future__ import annotations

import yaml
from prefect.flows import load_flow_from_entrypoint

from infra.env import REPO_ROOT as REPO


def deployments():
    return yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


def test_entrypoints_load_and_parameters_validate():
    seen = set()
    for d in deployments():
        flow = load_flow_from_entrypoint(str(REPO / d["entrypoint"]))
        schema = flow.parameters.model_dump()
        # inputs a stage needs (a corpus, a model folder) are asked for in the UI's run form
        required = {name: "some/path" for name in schema.get("required", [])}
        flow.validate_parameters({**required, **d.get("parameters", {})})  # raises on unknown/mistyped ones
        assert schema["properties"], d["name"]
        if d["entrypoint"].endswith("llm_pipeline_flow"):
            preset = schema["properties"]["preset"]
            choices = preset.get("enum") or next(
                (defn.get("enum") for defn in schema.get("definitions", {}).values() if "enum" in defn), None)
            assert choices == ["tiny", "small", "gpt2-124m"], preset
        seen.add(d["name"])
    assert {"tiny", "small", "gpt2-124m"} <= seen


def test_stage_flow_forms_show_the_stage_config_fields():
    flow = load_flow_from_entrypoint(str(REPO / "flows/stages.py:sft_flow"))
    schema = flow.parameters.model_dump()
    sft = schema["definitions"]["SFTConfig"]["properties"]
    assert {"steps", "lr", "batch_size", "sources", "lora"} <= set(sft)
    assert all(field.get("description") for field in sft.values())


def test_schedules_are_valid_cron():
    from prefect.client.schemas.schedules import CronSchedule

    crons = [s for d in deployments() for s in d.get("schedules", [])]
    assert crons
    for s in crons:
        CronSchedule(cron=s["cron"], timezone=s["timezone"])
