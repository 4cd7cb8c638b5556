"""End-to-end check of the way users run gptflow: servers, `prefect deploy --all`, a run started from the UI.

    python -m infra.check_deployments [--deployment data/data] [--parameters JSON] [--timeout S] [--keep]
    python -m infra.check_deployments --deployment llm-pipeline/tiny     # the whole pipeline (minutes)

In a fresh temporary workspace it serves Prefect, MLflow, a Ray head and a worker (`gptflow serve all`, on free
ports), runs `prefect --no-prompt deploy --all` from the repo root, starts a flow run of one deployment through
the API the way the UI's Run button does (`create_flow_run_from_deployment`), waits for a final state, checks
that the run's MLflow runs are on the MLflow server (tagged with the flow run's id), stops everything and
prints a summary. It also checks what `prefect deploy` stored: every deployment of prefect.yaml is on the server
with `enforce_parameter_schema`, each schedule with its cron, timezone and active flag, every parameter schema
holds a type and a description for each config field, the pipeline's form is pre-filled with its preset (every
stage a section), and the server refuses a run of `llm-pipeline/tiny` with a mistyped field, naming it.
Exit status 0 when all of that holds, the run completed and its MLflow runs are there, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from infra import services
from infra.env import REPO_ROOT, setup_env
from infra.prefect_server import free_port

# The data stage on the bundled sample crawl alone (no extra text sources): the cheapest deployment that runs a
# real stage, with an MLflow run, in well under a minute.
CHEAP = {"data/data": {"config": {"text_sources": {}, "executor": "local"}}}


def deploy_all(env: dict[str, str]) -> None:
    """`prefect --no-prompt deploy --all` from the repo root, as a user would run it."""
    out = subprocess.run([services._bin("prefect"), "--no-prompt", "deploy", "--all"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError("prefect deploy --all failed:\n" + (out.stdout + out.stderr)[-3000:])


async def run_deployment(name: str, parameters: dict, timeout: float) -> tuple[str, str, list[str]]:
    """Start a run of deployment `name` as the UI does and wait for a final state: (flow run id, state, deployment
    names on the server). RuntimeError if the deployment stored a path of this machine."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
        if str(REPO_ROOT) in json.dumps(deployment.pull_steps or []):
            raise RuntimeError(f"{name}'s pull steps hold this machine's path: {deployment.pull_steps}")
        run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        deadline = time.monotonic() + timeout
        while True:
            run = await client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                break
            if time.monotonic() > deadline:
                return str(run.id), f"not final after {timeout:.0f} s ({run.state.name if run.state else 'no state'})", []
            await asyncio.sleep(2)
        flows = {f.id: f.name for f in await client.read_flows()}
        names = sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in await client.read_deployments())
        return str(run.id), run.state.name, names


# the sections of the pipeline's config form (flows/config.py PipelineConfig; infra does not import flows)
PIPELINE_SECTIONS = ("data", "tokenizer", "pretrain", "sft", "align", "eval", "decontam", "classify", "registry",
                     "timeouts")


def schema_problems(name: str, schema: dict[str, Any]) -> list[str]:
    """What the UI's run form of deployment `name` would lack: a config field without a type or a description,
    and, for the pipeline, a stage section or a preset value."""
    problems = []
    for model, definition in schema.get("definitions", {}).items():
        for field, spec in definition.get("properties", {}).items():
            if not spec.get("description"):
                problems.append(f"{name}: {model}.{field} has no description")
            if not {"type", "anyOf", "allOf", "$ref", "enum"} & set(spec):
                problems.append(f"{name}: {model}.{field} has no type")
    if name.startswith("llm-pipeline/"):
        default = schema["properties"].get("config", {}).get("default") or {}
        missing = [s for s in PIPELINE_SECTIONS if s not in default]
        if missing or default.get("preset") != name.split("/", 1)[1]:
            problems.append(f"{name}: the form is not pre-filled with its preset (sections missing: {missing})")
    return problems


async def check_served(yaml_deployments: list[dict[str, Any]]) -> list[str]:
    """Each deployment of prefect.yaml as the server holds it: schedules, enforced parameter schemas, forms; and
    a mistyped pipeline parameter refused, naming the field. Returns the problems found (none: all good)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    problems: list[str] = []
    async with get_client() as client:
        flows = {f.id: f.name for f in await client.read_flows()}
        served = {f"{flows.get(d.flow_id, '?')}/{d.name}": d for d in await client.read_deployments()}
        by_name = {name.split("/", 1)[1]: name for name in served}
        for spec in yaml_deployments:
            full = by_name.get(spec["name"])
            if full is None:
                problems.append(f"{spec['name']}: not on the server")
                continue
            d = served[full]
            if not d.enforce_parameter_schema:
                problems.append(f"{full}: parameter schema not enforced")
            want = sorted((s["cron"], s["timezone"], s.get("active", True)) for s in spec.get("schedules", []))
            got = sorted((s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules)
            if want != got:
                problems.append(f"{full}: schedules {got} on the server, {want} in prefect.yaml")
            problems += schema_problems(full, d.parameter_openapi_schema or {})
        tiny = served.get("llm-pipeline/tiny")
        if tiny is not None:
            config = json.loads(json.dumps(tiny.parameter_openapi_schema["properties"]["config"]["default"]))
            config["pretrain"]["lr"] = "fast"
            try:
                run = await client.create_flow_run_from_deployment(tiny.id, parameters={"config": config})
                problems.append(f"llm-pipeline/tiny: a run with pretrain.lr='fast' was created ({run.id})")
                await client.delete_flow_run(run.id)
            except PrefectHTTPStatusError as e:
                if "config.pretrain.lr" not in e.response.text:
                    problems.append(f"llm-pipeline/tiny: the refusal does not name the field: {e.response.text[:300]}")
    return problems


def mlflow_runs(tracking_uri: str, flow_run_id: str) -> list[dict]:
    """The MLflow server's runs tagged with this Prefect flow run (over its REST API: infra never imports mlflow)."""
    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(f"{tracking_uri}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    experiments = post("experiments/search", {"max_results": 1000}).get("experiments", [])
    found = post("runs/search", {"experiment_ids": [e["experiment_id"] for e in experiments],
                                 "filter": f"tags.prefect_flow_run_id = '{flow_run_id}'"})
    return found.get("runs", [])


async def flow_run_artifacts(flow_run_id: str) -> list[str]:
    """The keys of the Prefect artifacts the flow run published (the run report and the eval table)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        return sorted(a.key for a in found if a.key)


def registry_aliases(tracking_uri: str, name: str) -> dict[str, str]:
    """{alias: version} of a registered model on the MLflow server ({} when it does not exist)."""
    query = urllib.parse.urlencode({"name": name})
    try:
        with urllib.request.urlopen(f"{tracking_uri}/api/2.0/mlflow/registered-models/get?{query}", timeout=30) as r:
            model = json.loads(r.read())["registered_model"]
    except urllib.error.HTTPError:
        return {}
    return {a["alias"]: a["version"] for a in model.get("aliases", [])}


def pipeline_problems(flow_run_id: str, tracking_uri: str, model: str) -> list[str]:
    """What a pipeline run must leave: the report and eval-table artifacts on its flow run, and its model's
    versions in the registry with the `candidate` and `champion` aliases."""
    problems = []
    keys = asyncio.run(flow_run_artifacts(flow_run_id))
    problems += [f"no Prefect artifact {k!r} on the flow run (found {keys})" for k in ("run-report", "eval-results")
                 if k not in keys]
    aliases = registry_aliases(tracking_uri, model)
    problems += [f"registered model {model!r} has no alias {a!r} (aliases {aliases})" for a in ("candidate", "champion")
                 if a not in aliases]
    return problems


def check(deployment: str, parameters: dict, timeout: float, home: Path, echo=print,
          screenshots: Path | None = None) -> bool:
    os.environ["GPTFLOW_HOME"] = str(home)
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_HOME"):
        os.environ.pop(var, None)  # this workspace's servers, not whatever the caller points at
    setup_env()
    started = time.monotonic()
    try:
        services.start_all(ports={name: free_port() for name in services.SERVICES[:-1]}, home=home, echo=echo)
        echo(f"served in {time.monotonic() - started:.0f} s")
        prefect, mlflow = services.read_state("prefect", home), services.read_state("mlflow", home)
        api = prefect.export.split("=", 1)[1]
        tracking = mlflow.export.split("=", 1)[1]
        os.environ["PREFECT_API_URL"] = api
        t0 = time.monotonic()
        deploy_all({**os.environ, "PREFECT_HOME": str(home / "deployer")})
        echo(f"deployed prefect.yaml in {time.monotonic() - t0:.0f} s")
        specs = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
        problems = asyncio.run(check_served(specs))
        t0 = time.monotonic()
        run_id, state, names = asyncio.run(run_deployment(deployment, parameters, timeout))
        run_s = time.monotonic() - t0
        runs = mlflow_runs(tracking, run_id)
        pipeline = deployment.startswith("llm-pipeline/")
        model = f"gpt-{deployment.split('/', 1)[1]}"
        if pipeline and state == "Completed":
            problems += pipeline_problems(run_id, tracking, model)
        if screenshots is not None and state == "Completed":
            from infra import screenshots as shots

            ui = api.removesuffix("/api")
            argv = ["--mlflow-url", tracking, "--model", model if pipeline else "gpt-tiny", "--prefect-url", ui,
                    "--deployment", deployment, "--out", str(screenshots)]
            if shots.main(argv) != 0:
                problems.append(f"the UI screenshots in {screenshots} miss what they must show (see above)")
    finally:
        t0 = time.monotonic()
        for name in reversed(services.SERVICES):
            services.stop(name, home, echo=lambda _: None)
        echo(f"stopped in {time.monotonic() - t0:.0f} s")
    ok = state == "Completed" and bool(runs) and not problems
    echo("\n=== deployment check ===")
    echo(f"deployments on the server: {len(names)} ({', '.join(names)})")
    scheduled = sum(bool(s.get("schedules")) for s in specs)
    echo(f"schedules and parameter schemas of {len(specs)} deployments ({scheduled} scheduled): "
         + ("as prefect.yaml says; a mistyped parameter is refused naming the field" if not problems
            else "PROBLEMS:\n  " + "\n  ".join(problems)))
    echo(f"flow run {run_id} of {deployment}: {state} in {run_s:.0f} s (picked up by the worker)")
    if deployment.startswith("llm-pipeline/") and state == "Completed":
        echo("Prefect artifacts (run-report, eval-results) and registry aliases (candidate, champion): "
             + ("present" if not any("artifact" in p or "alias" in p for p in problems) else "MISSING"))
    echo(f"MLflow runs on the server for it: {len(runs)} (" + ", ".join(
        r["info"].get("run_name", "?") + ":" + r["info"]["status"] for r in runs) + ")")
    echo(f"total {time.monotonic() - started:.0f} s; logs in {home / 'services'}; {'OK' if ok else 'FAILED'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.check_deployments", description=__doc__.split("\n\n")[0])
    p.add_argument("--deployment", default="data/data", help="FLOW/DEPLOYMENT to run (default data/data; "
                                                              "llm-pipeline/tiny: the whole pipeline)")
    p.add_argument("--parameters", type=json.loads, help="the run's parameters as JSON, as the UI's form sends them "
                                                         "(default: the deployment's own; for data/data, no extra text sources)")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the run to finish (default 900)")
    p.add_argument("--workspace", type=Path, help="workspace folder (default: a new temporary one, kept for its logs)")
    p.add_argument("--screenshots", type=Path, metavar="DIR",
                   help="after the run, screenshot the Prefect and MLflow UIs into DIR (infra.screenshots, Chromium)")
    args = p.parse_args(argv)
    home = (args.workspace or Path(tempfile.mkdtemp(prefix="gptflow-check-"))).resolve()
    params = args.parameters if args.parameters is not None else CHEAP.get(args.deployment, {})
    try:
        return 0 if check(args.deployment, params, args.timeout, home, screenshots=args.screenshots) else 1
    except (services.ServiceError, RuntimeError) as e:
        print(f"check_deployments: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
