"""Through a real Prefect server (the session's, started on first use as every flow run of the suite does): a
run of the tiny pipeline deployment with a bad parameter is refused at creation, naming the field (the UI's run
form posts the same request), and a flow run's task runs are named by stage (`pretrain`, `eval-sft`).

    python -m pytest tests/unit/test_deployment_server.py -x -q      (~30 s, most of it the server's start)
"""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.exceptions import PrefectHTTPStatusError
from prefect.utilities.callables import parameter_schema

from flows.deployments import TINY, tiny_pipeline_flow
from flows.stages import eval_task, pretrain_task
from tasks.evaluate import EvalConfig
from tasks.refs import ModelRef, ShardsRef, TokenizerRef


def test_the_server_refuses_a_run_with_a_bad_parameter_naming_the_field():
    bad = TINY.model_dump(mode="json")
    bad["pretrain"]["lr"] = "fast"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(tiny_pipeline_flow)
        deployment = client.create_deployment(flow_id, "forms-check", entrypoint="flows/deployments.py:tiny_pipeline_flow",
                                              parameter_openapi_schema=parameter_schema(tiny_pipeline_flow).model_dump(),
                                              enforce_parameter_schema=True)
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(deployment, parameters={"config": bad})
        assert refused.value.response.status_code == 409
        assert "Validation failed for field 'config.pretrain.lr'" in refused.value.response.text
        unknown = {**TINY.model_dump(mode="json"), "pretrian": {}}
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(deployment, parameters={"config": unknown})
        assert "'pretrian' was unexpected" in refused.value.response.text


@flow(name="task-names-check")
def _two_stages(root: str) -> None:
    """Two stage tasks on inputs that do not exist: each fails at once, after its task run was named."""
    missing = f"{root}/missing"
    pretrain_task(TINY.pretrain, ShardsRef(path=missing), root, return_state=True)
    eval_task(EvalConfig(limit=1, data_dir=root), ModelRef(path=missing), TokenizerRef(path=missing), root, None,
              "sft", return_state=True)


def test_task_runs_are_named_by_stage(tmp_path, sqlite_mlflow):
    state = _two_stages(str(tmp_path), return_state=True)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert sorted(r.name for r in runs) == ["eval-sft", "pretrain"]
    assert all(r.state.is_failed() for r in runs)  # the inputs do not exist: nothing ran


def test_a_flow_run_with_a_bad_parameter_fails_at_its_start_naming_the_field():
    bad = TINY.model_dump(mode="json")
    bad["sft"]["steps"] = "many"
    state = tiny_pipeline_flow(config=bad, return_state=True)
    assert state.is_failed()
    assert "config.sft.steps: Input should be a valid integer" in state.message, state.message
