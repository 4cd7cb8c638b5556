"""prefect.yaml: every deployment's entrypoint loads, its parameter schema (built as `prefect deploy` builds it:
`parameter_schema(load_flow_from_entrypoint(...))`) is the typed form the Prefect UI shows, every stage's fields
with types, defaults and descriptions; a wrong type or an unknown key is refused, naming the field, by the schema
(as the server does with `enforce_parameter_schema`) and at the flow's start; the schedules parse.

    python -m pytest tests/unit/test_deployments.py -x -q      (~15 s, no server)
"""

from __future__ import annotations

import functools
import importlib

import pytest
import yaml
from prefect.exceptions import ParameterTypeError
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import ValidationError, validate

from flows.config import PipelineConfig, TimeoutsConfig
from flows.presets import PRESETS
from infra.env import REPO_ROOT as REPO

STAGES = ["data", "tokenizer", "pretrain", "sft", "align", "eval", "decontam", "classify", "registry", "timeouts"]


def deployments() -> list[dict]:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


@functools.cache
def built(entrypoint: str):
    """The flow and the parameter schema `prefect deploy` stores for this entrypoint (prefect/cli/deploy/_core.py:
    `parameter_schema(load_flow_from_entrypoint(...))`); the module is imported once rather than run from its
    file for each entrypoint (`test_each_entrypoint_file_loads_as_prefect_deploy_loads_it`)."""
    path, name = entrypoint.split(":")
    flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
    return flow, parameter_schema(flow).model_dump()


def test_each_entrypoint_file_loads_as_prefect_deploy_loads_it():
    for path in sorted({d["entrypoint"].split(":")[0] for d in deployments()}):
        name = next(d["entrypoint"] for d in deployments() if d["entrypoint"].startswith(path + ":"))
        flow = load_flow_from_entrypoint(str(REPO / name))
        assert parameter_schema(flow).model_dump() == built(name)[1], name


def by_name(name: str) -> dict:
    return next(d for d in deployments() if d["name"] == name)


def test_the_deployments_cover_each_preset_each_stage_the_schedules_and_a_registered_model():
    names = {d["name"]: d["entrypoint"].split(":")[1] for d in deployments()}
    assert {"tiny", "small", "gpt2-124m"} <= set(names)
    stage_flows = {"data_flow", "tokenizer_flow", "pretrain_flow", "sft_flow", "reward_flow", "dpo_flow", "ppo_flow",
                   "grpo_flow", "eval_flow", "classify_flow", "eval_registered_flow", "pretrain_eval_flow"}
    assert stage_flows <= set(names.values()), stage_flows - set(names.values())
    assert all(d.get("enforce_parameter_schema") is True for d in deployments())
    nightly, weekly = by_name("nightly"), by_name("weekly")
    assert names["nightly"] == "data_flow" and nightly["schedules"][0]["active"] is True
    assert names["weekly"] == "pretrain_eval_flow" and weekly["schedules"][0]["cron"] == "0 3 * * 6"


def test_every_deployment_loads_and_its_own_parameters_validate_against_its_schema():
    for d in deployments():
        flow, schema = built(d["entrypoint"])
        assert schema["properties"], d["name"]
        required = {name: "some/path" for name in schema.get("required", [])}  # a stage's input folders
        params = {**required, **d.get("parameters", {})}
        validate(params, schema, raise_on_error=True)  # what the server checks at run creation
        flow.validate_parameters(params)  # what the flow checks at its start
        # every stage flow runs without anything but its input folders: each config has a default
        assert set(schema.get("required", [])) <= {"corpus", "shards", "model", "tokenizer"}, (d["name"], schema["required"])


@pytest.mark.parametrize("preset", ["tiny", "small", "gpt2-124m"])
def test_the_pipeline_form_shows_every_stage_with_the_presets_values_and_descriptions(preset):
    flow, schema = built(by_name(preset)["entrypoint"])
    assert flow.name == "llm-pipeline"
    config = schema["properties"]["config"]
    assert config["default"] == PRESETS[preset]().model_dump(mode="json")  # the form is pre-filled with the preset
    defs = schema["definitions"]
    pipeline = defs["PipelineConfig"]["properties"]
    assert set(STAGES) <= set(pipeline)
    for stage in STAGES:
        assert pipeline[stage].get("description"), stage
        section = defs[pipeline[stage]["$ref"].split("/")[-1]]
        assert section.get("additionalProperties") is False, stage  # an unknown key is refused
        # every field of the stage: a type, a description, and a value in the preset's defaults
        assert set(section["properties"]) == set(config["default"][stage]), stage
        for name, field in section["properties"].items():
            assert field.get("description"), f"{stage}.{name} has no description"
            assert {"type", "anyOf", "$ref", "allOf", "enum"} & set(field), f"{stage}.{name} has no type"
    pretrain = defs["PretrainConfig"]["properties"]
    assert pretrain["lr"]["type"] == "number" and pretrain["steps"]["type"] == "integer"
    assert defs["GPTConfig"]["properties"]["n_layer"]["description"]


def _tiny_with(path: str, value) -> dict:
    config = PRESETS["tiny"]().model_dump(mode="json")
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value
    return {"config": config}


@pytest.mark.parametrize(("path", "value", "reason"), [
    ("pretrain.lr", "fast", "is not of type 'number'"),
    ("sft.stepz", 3, "'stepz' was unexpected"),
    ("pretrain.model.n_layer", 1.5, "is not of type 'integer'"),
])
def test_a_bad_value_is_refused_by_the_schema_and_at_the_flows_start_naming_the_field(path, value, reason):
    flow, schema = built(by_name("tiny")["entrypoint"])
    params = _tiny_with(path, value)
    with pytest.raises(ValidationError) as refused:
        validate(params, schema, raise_on_error=True)
    field = "config." + (path if reason.startswith("is not") else path.rsplit(".", 1)[0])
    assert f"field '{field}'" in str(refused.value) and reason in str(refused.value), str(refused.value)
    with pytest.raises(ParameterTypeError) as at_start:
        flow.validate_parameters(params)
    assert f"config.{path}:" in str(at_start.value), str(at_start.value)


def test_stage_flow_forms_show_the_stage_config_fields():
    _, schema = built("flows/stages.py:sft_flow")
    sft = schema["definitions"]["SFTConfig"]["properties"]
    assert {"steps", "lr", "batch_size", "sources", "lora"} <= set(sft)
    assert all(field.get("description") for field in sft.values())
    _, schema = built("flows/stages.py:pretrain_flow")
    assert schema["required"] == ["shards"]  # pretraining's config has a default now: the tiny preset's
    assert schema["properties"]["config"]["default"] == PRESETS["tiny"]().pretrain.model_dump(mode="json")
    _, schema = built("flows/stages.py:eval_registered_flow")
    assert schema["properties"]["model"]["default"] == "models:/gpt-tiny@champion" and not schema.get("required")


def test_every_timed_task_has_a_limit_in_the_config_and_each_preset_sets_them():
    from flows import stages

    timed = {t.name for t in vars(stages).values() if isinstance(t, stages.Task) and t.timeout_seconds}
    assert timed == set(TimeoutsConfig.model_fields)  # `limited` finds each one's limit
    assert PRESETS["tiny"]().timeouts.pretrain == 3600 and PRESETS["small"]().timeouts == TimeoutsConfig()
    assert stages.limited(stages.pretrain_task, PipelineConfig.model_validate(
        _tiny_with("timeouts.pretrain", 60.0)["config"]).timeouts).timeout_seconds == 60.0
    io = {t.name: t.retries for t in vars(stages).values() if isinstance(t, stages.Task) and t.retries}
    assert io == {"register": 3, "promote": 3, "download": 3}  # IO is retried; compute never is


def test_schedules_are_valid_cron():
    from prefect.client.schemas.schedules import CronSchedule

    crons = [s for d in deployments() for s in d.get("schedules", [])]
    assert len(crons) == 2
    for s in crons:
        CronSchedule(cron=s["cron"], timezone=s["timezone"])
