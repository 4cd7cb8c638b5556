"""The files for running past one machine (infra/Dockerfile, infra/k8s/) checked as far as this machine can: they
parse, the Kubernetes manifests have the shape their kinds need (KubeRay's RayCluster and RayJob, a Deployment),
the work pool's base job template passes Prefect's own validation and renders a Job with our defaults, and the
image installs what the manifests run. No cluster and no Docker daemon here: see infra/README.md.

    .venv/bin/python -m pytest tests/unit/test_infra_files.py -x -q      # ~3 s
"""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import yaml

from infra.env import REPO_ROOT

K8S = REPO_ROOT / "infra" / "k8s"
IMAGE = "gptflow:0.1.0"
# The keys prefect-kubernetes' KubernetesWorkerJobConfiguration reads (prefect-kubernetes is not installed here).
K8S_WORKER_KEYS = {"command", "env", "labels", "name", "namespace", "job_manifest", "cluster_config",
                   "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output"}


def manifests() -> dict[str, dict]:
    """kind/name -> document, for every YAML document in infra/k8s."""
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path.name}: not a Kubernetes object"
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def pod_specs(doc: dict) -> list[dict]:
    """The pod specs of a RayCluster spec: the head's, then each worker group's."""
    return [doc["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in doc["workerGroupSpecs"])]


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    """What KubeRay needs of a RayCluster spec, and what gptflow needs of its pods."""
    assert spec["rayVersion"] == version("ray"), f"{where}: rayVersion is not the installed Ray"
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:  # KubeRay's rayStartParams is map[string]string: a YAML number is refused
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), f"{where}: {group['rayStartParams']}"
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}: {g['groupName']} replicas"
    assert len({g["groupName"] for g in spec["workerGroupSpecs"]}) == len(spec["workerGroupSpecs"])
    for pod in pod_specs(spec):
        (container,) = pod["containers"]
        assert container["image"].startswith(IMAGE), f"{where}: {container['image']}"
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert env["GPTFLOW_HOME"] in mounts, f"{where}: the workspace is not on a volume shared by every pod"
        assert pod["securityContext"]["runAsUser"] != 0
    head_ports = {p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265} <= head_ports


def test_ray_cluster_and_ray_job_have_kuberays_shape():
    docs = manifests()
    cluster, job = docs["RayCluster/gptflow"], docs["RayJob/gptflow-tiny"]
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    check_ray_cluster_spec(cluster["spec"], "raycluster.yaml")
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"], "rayjob.yaml")
    assert job["spec"]["entrypoint"].startswith("gptflow run")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    claim = docs["PersistentVolumeClaim/gptflow-workspace"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    claims = {v["persistentVolumeClaim"]["claimName"] for s in (cluster["spec"], job["spec"]["rayClusterSpec"])
              for pod in pod_specs(s) for v in pod["volumes"]}
    assert claims == {"gptflow-workspace"}


def test_ray_spec_check_catches_a_numeric_start_param():
    spec = manifests()["RayCluster/gptflow"]["spec"]
    bad = {**spec, "headGroupSpec": {**spec["headGroupSpec"], "rayStartParams": {"num-cpus": 0}}}
    with pytest.raises(AssertionError, match="num-cpus"):
        check_ray_cluster_spec(bad, "bad")


def test_work_pool_template_passes_prefects_validation_and_renders_a_job():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    template = json.loads((K8S / "prefect-work-pool.json").read_text())
    WorkPoolCreate(name="gptflow-k8s", type="kubernetes", base_job_template=template)  # the server's own check
    assert K8S_WORKER_KEYS <= template["job_configuration"].keys()
    variables = template["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validate(defaults, variables)  # the defaults the UI's form shows are valid values

    job = apply_values(template["job_configuration"], defaults)["job_manifest"]  # what the worker does
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE and container["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "gptflow-workspace"
    assert "{{" not in json.dumps(job["spec"]["template"]["spec"]["volumes"])
    with pytest.raises(ValueError, match="undeclared"):  # a placeholder without a variable is refused
        WorkPoolCreate(name="x", type="kubernetes", base_job_template={
            **template, "job_configuration": {**template["job_configuration"], "extra": "{{ nope }}"}})


def test_mlflow_runs_on_postgres_and_s3_with_secrets_from_kubernetes():
    docs = manifests()
    (container,) = docs["Deployment/mlflow"]["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert container["command"] == ["mlflow", "server"]
    assert "--backend-store-uri=$(BACKEND_STORE_URI)" in args and "--artifacts-destination=s3://" in args
    env = {e["name"]: e for e in container["env"]}
    for secret in ("BACKEND_STORE_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[secret]["valueFrom"], f"{secret} must come from a Secret, not the manifest"
    service = docs["Service/mlflow"]["spec"]
    assert service["selector"].items() <= docs["Deployment/mlflow"]["spec"]["template"]["metadata"]["labels"].items()


def test_dockerfile_builds_a_non_root_image_of_the_pinned_project():
    text = (REPO_ROOT / "infra" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^USER (\w+)$", text, re.M).group(1) not in ("root", "0")
    assert "GPTFLOW_REPO=/opt/gptflow" in text and "-c /tmp/constraints.txt" in text
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()}
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for name in src.split():
            assert (REPO_ROOT / name).exists() and name not in ignored, f"COPY {name}: not in the build context"
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    extra = re.search(r'^ARG EXTRAS=(\w+)$', text, re.M).group(1)
    assert re.search(rf"^{extra} = \[.*ray\[default\].*psycopg.*boto3", pyproject, re.M)
    for pin in ("psycopg==", "psycopg-binary==", "boto3==", "py-spy=="):  # the extra is pinned too
        assert pin in (REPO_ROOT / "constraints.txt").read_text()


def test_no_secret_in_infra_files():
    for path in [*K8S.iterdir(), REPO_ROOT / "infra" / "Dockerfile"]:
        text = path.read_text()
        assert not re.search(r"postgresql://\w+:(?!<)[^@\s]+@", text), f"{path.name}: a password in a URI"
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path.name}: an AWS key"


@pytest.mark.parametrize("path", sorted(K8S.glob("*.json")) + sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_every_infra_file_parses(path: Path):
    load = json.loads if path.suffix == ".json" else lambda t: list(yaml.safe_load_all(t))
    assert load(path.read_text())
