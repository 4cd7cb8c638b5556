"""MLflow at the edges: the only module that imports mlflow.

One parent run per pipeline run, one nested run per stage. Stage wrappers call `stage_run(...)` and
`log_stage(...)` (through `flows.stages.tracked_stage`); the trainer's rank 0 logs through `MetricLogger` with the run id it is given.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from infra.env import REPO_ROOT, workspace
from infra.locks import file_lock
from tasks.model_card import DatasetFacts
from tasks.refs import InputRef, ModelRef, Ref, RegisteredModel, TokenizerRef
from tasks.registry import RegistryConfig
from tasks.stage import GptflowError, is_url

EXPERIMENT = "llm-pipeline"
COMPUTED_IN = "mlflow_run_id.txt"  # in a stage folder: the MLflow run that computed it (`flows.stages.tracked_stage`)
log = logging.getLogger(__name__)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def set_experiment() -> None:
    """Select the experiment; on a local store, create it with its artifacts in the workspace.

    A local sqlite store's default artifact root is `./mlruns` of whatever folder the process runs in, which
    scattered model artifacts over the user's working folders; a tracking server decides for itself. On a sqlite
    store this holds the database's file lock: the first access creates and migrates its tables, which two
    processes starting at once (two pipelines on a fresh workspace) did both, one failing with "duplicate column".
    """
    check_server()
    db = sqlite_file(tracking_uri())
    with file_lock(db.with_name(f"{db.name}.lock"), "MLflow") if db else nullcontext():
        if mlflow.get_experiment_by_name(EXPERIMENT) is None and not tracking_uri().startswith(("http:", "https:")):
            try:
                mlflow.create_experiment(EXPERIMENT, artifact_location=(workspace() / "mlartifacts").as_uri())
            except MlflowException:  # created meanwhile by a process on another machine
                pass
        mlflow.set_experiment(EXPERIMENT)


def check_server(tries: int = 3, timeout_s: float = 5.0) -> None:
    """A tracking server that does not answer its health check after `tries` (1 s, then 2 s apart) is one error
    naming its URL, before any stage starts; MLflow's own client would retry for minutes, then print a page of
    connection-pool traceback. A local store (sqlite) needs no check."""
    uri = tracking_uri()
    if not uri.startswith(("http:", "https:")):
        return
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
                return
        except OSError as e:  # refused, timed out, an HTTP error (HTTPError is an OSError too)
            reason = getattr(e, "reason", e)
            if attempt + 1 < tries:
                time.sleep(attempt + 1)
    raise GptflowError(f"the MLflow server at {shown_uri(uri)} does not answer ({reason}): start it again (or "
                       "point MLFLOW_TRACKING_URI at one that runs) and rerun; finished stages are kept and reused")


def shown_uri(uri: str) -> str:
    return re.sub(r"//[^/@]*@", "//", uri)  # never a password from the URL in a message


def lost_server(e: BaseException) -> bool:
    """Whether `e` is MLflow's client giving up on a tracking server that does not answer (refused, reset, timed
    out, after the bounded retries `infra.env` sets), rather than the server refusing a request."""
    return (isinstance(e, MlflowException) and tracking_uri().startswith(("http:", "https:"))
            and str(e).startswith("API request to ") and " failed with " in str(e))


@contextmanager
def server_errors() -> Iterator[None]:
    """MLflow calls whose server stopped answering mid-run: one line naming the server instead of MLflow's page of
    connection-pool traceback. A stage folder already sealed stays, and the rerun reuses it."""
    try:
        yield
    except MlflowException as e:
        if not lost_server(e):
            raise
        reason = next((r for r in ("connection refused", "timed out", "connection reset") if r in str(e).lower()),
                      "no answer")
        raise GptflowError(f"the MLflow server at {shown_uri(tracking_uri())} stopped answering mid-run ({reason}): "
                           "start it again and rerun; finished stages are kept and reused") from None


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI; None for a server or another database."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextmanager
def pipeline_run(name: str, config: Mapping[str, Any], tags: Mapping[str, str]) -> Iterator[str]:
    """The parent run: resolved config as params and `config.json`, git sha and preset as tags."""
    with _run(name, {"git_sha": git_sha(), **tags}) as run_id:
        log_params(run_id, flatten(config))
        MlflowClient().log_dict(run_id, dict(config), "config.json")
        yield run_id


@contextmanager
def _run(name: str, tags: Mapping[str, str]) -> Iterator[str]:
    """A run created and ended through the client, so no thread-local "active run" leaks between tasks. The
    store's first access is `set_experiment`'s, under its lock: a client made before it opened a fresh sqlite
    store unlocked, racing a second pipeline's migration ("table mcp_servers already exists")."""
    tags = dict(tags)
    flow_run = _prefect_flow_run_id()
    if flow_run:
        tags["prefect_flow_run_id"] = flow_run
    with server_errors():
        set_experiment()
        client = MlflowClient()
        exp = mlflow.get_experiment_by_name(EXPERIMENT)
        run = client.create_run(exp.experiment_id, run_name=name, tags=tags)
    status = "FAILED"
    try:
        with server_errors():
            yield run.info.run_id
        status = "FINISHED"
    finally:
        end_run(client, run.info.run_id, status)


def end_run(client: MlflowClient, run_id: str, status: str) -> None:
    """Mark the run ended; with the server gone, a failed run's error already on its way up says so (a warning
    here, not a second traceback over it), and a finished run's end is that error."""
    try:
        client.set_terminated(run_id, status=status)
    except MlflowException as e:
        if not lost_server(e) or status == "FINISHED":
            with server_errors():
                raise
        log.warning("could not mark MLflow run %s %s: its server does not answer", run_id, status)


@contextmanager
def stage_run(stage: str, parent_run_id: str | None, tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """A nested run for one stage under `parent_run_id` (or a top-level run when a stage runs alone)."""
    all_tags = {"stage": stage, "git_sha": git_sha(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with _run(stage, all_tags) as run_id:
        yield run_id


def _prefect_flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return flow_run.get_id()
    except Exception:  # outside a flow, or prefect not importable
        return None


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    client = MlflowClient()
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(metric_name(k), float(v), ts, step) for k, v in metrics.items() if _is_number(v)]
    client = MlflowClient()
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i : i + 500])


def metric_name(key: str) -> str:
    """MLflow allows letters, digits, `_ - . / ` and spaces; lm-eval's `acc,none` becomes `acc_none`."""
    return re.sub(r"[^\w\-./ ]", "_", key)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def log_text(run_id: str, text: str, name: str) -> None:
    MlflowClient().log_text(run_id, text, name)


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    client = MlflowClient()
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path or path.name)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def log_stage(run_id: str, ref: Ref, cfg: BaseModel, inputs: Mapping[str, Ref]) -> None:
    """A stage's params, counts, metrics, manifest and the files its ref marks as artifacts; its output's content
    hash as the tag `output_sha256`; for a reused folder, the run that computed it (with the per-step curves) as the
    tag `computed_in_run`; its data inputs (crawl files, corpus, token shards, SFT and preference data,
    benchmarks) as MLflow dataset inputs, for lineage (`stage_dataset`)."""
    log_params(run_id, flatten(cfg.model_dump(mode="json")))
    metrics = {f"{ref.stage}/{k}": v for k, v in flatten(ref.counts).items()}
    metrics.update(flatten(ref.metrics))
    metrics["time/seconds"] = ref.seconds
    log_metrics(run_id, metrics)
    client = MlflowClient()
    client.set_tag(run_id, "cached", str(ref.cached).lower())
    client.set_tag(run_id, "stage_dir", str(ref.dir))
    if ref.cached and (made := Path(ref.dir) / COMPUTED_IN).exists():  # where the reused stage's curves are
        client.set_tag(run_id, "computed_in_run", made.read_text().strip())
    log_artifact(run_id, Path(ref.manifest))
    for name in ref.artifacts:
        if ref.file(name).exists():
            log_artifact(run_id, ref.file(name))
    client.set_tag(run_id, "output_sha256", ref.sha256)  # the next stage's dataset input of it has this digest
    datasets = [stage_dataset(name, source) for name, source in inputs.items()]
    log_datasets(run_id, [d for d in datasets if d is not None])


def stage_dataset(name: str, source: Ref) -> DatasetFacts | None:
    """A stage input as a dataset for lineage: a stage folder that is a dataset (corpus, token shards) under its
    dataset name, a file or URL the user gave (crawl files, SFT and preference data, benchmarks) under its input
    name; None for a model or a tokenizer (their own stage run records what they came from)."""
    if source.dataset_name:
        return DatasetFacts(stage="", name=source.dataset_name, path=source.path, sha256=source.sha256,
                            profile=source.profile())
    if isinstance(source, InputRef):
        return DatasetFacts(stage="", name=name, path=source.path, sha256=source.sha256)
    return None


def log_datasets(run_id: str, datasets: list[DatasetFacts]) -> None:
    """Record datasets as MLflow dataset inputs of a run: lineage in its "Datasets used", each with its content
    digest (two runs on the same data show the same dataset) and where it is (a local file's URI or a URL)."""
    from mlflow.entities import DatasetInput

    if not datasets:
        return
    inputs = [DatasetInput(_dataset(d), _input_tags(d)) for d in datasets]
    for attempt in range(4):
        try:
            MlflowClient().log_inputs(run_id, inputs)
            return
        except MlflowException as e:
            # MLflow's SQL store looks a dataset up, then inserts it: two runs logging the same dataset at once
            # (two pipelines on one workspace) race, and the loser hits the unique key. Its retry finds the row.
            if ("UNIQUE constraint" not in str(e) and "duplicate key" not in str(e)) or attempt == 3:
                raise
            time.sleep(0.2 * (attempt + 1))


def _dataset(d: DatasetFacts):
    from mlflow.entities import Dataset

    local = not is_url(d.path) and Path(d.path).exists()
    kind = "local" if local else d.path.split("://")[0] if "://" in d.path else "hub"
    source = json.dumps({"uri": Path(d.path).resolve().as_uri() if local else d.path})
    return Dataset(name=_dataset_name(d), digest=d.sha256[:20], source_type=kind, source=source,
                   profile=json.dumps(dict(d.profile), default=str))


def _dataset_name(d: DatasetFacts) -> str:
    """A file's name (a crawl file, SFT data), a folder stage's dataset name (corpus, token-shards)."""
    if d.name.startswith(("input_", "text_", "data_", "sft_", "preference_", "prompts")) or d.name == "data":
        return d.path.rstrip("/").rsplit("/", 1)[-1]
    return {"shards": "token-shards"}.get(d.name, d.name)


def _input_tags(d: DatasetFacts):
    from mlflow.entities import InputTag

    tags = [InputTag("mlflow.data.context", "evaluation" if d.name == "benchmarks" else "training"),
            InputTag("gptflow.input", d.name)]
    return tags + ([InputTag("gptflow.stage", d.stage)] if d.stage else [])


class MetricLogger:
    """Rank-0 metric logging to a given run id (other ranks use `tasks.refs.NullLogger`, which avoids mlflow);
    get one with `RunLink.logger(rank)`."""

    def __init__(self, run_id: str, tracking_uri: str | None = None):
        self.run_id = run_id
        self.lost = False
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log, unless the server has stopped answering: then one warning, and the fit goes on without its curve
        rather than lose hours of training to the tracking server; the stage's wrapper reports the server when it
        logs the stage's results (`server_errors`)."""
        if self.lost:
            return
        try:
            log_metrics(self.run_id, metrics, step)
        except MlflowException as e:
            if not lost_server(e):
                raise
            self.lost = True
            log.warning("step %d: the MLflow server at %s stopped answering; training goes on without logging "
                        "its metrics", step, shown_uri(tracking_uri()))


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def run_url(run_id: str) -> str:
    run = MlflowClient().get_run(run_id)
    return f"{tracking_uri()} experiment {run.info.experiment_id} run {run_id}"


def register_model(run_id: str, model: ModelRef, tokenizer: TokenizerRef, cfg: RegistryConfig,
                   tags: Mapping[str, str], card: str = "", datasets: Sequence[DatasetFacts] = ()) -> RegisteredModel:
    """Log the chat model and register it: one logged model holding our safetensors weights + config + tokenizer
    (loaded by code, no pickles) and the same model in Hugging Face format under `hf/` (`export_hf`, with `card`
    as its README.md). `datasets` (the run's lineage) become dataset inputs of the registering run, and the
    version's scores (`score.*` tags) metrics of the logged model against the benchmarks."""
    from tasks import pyfunc_model

    def hf_folder(tmp: Path) -> dict[str, str]:
        from models.checkpoint import load_config
        from models.export import export_hf

        unsupported = load_config(Path(model.path)).hf_unsupported
        if unsupported:
            log.warning("model %s: no hf/ folder, transformers has no equivalent of %s", cfg.model_name,
                        ", ".join(unsupported))
            return {}
        out = export_hf(Path(model.path), tokenizer.tokenizer_json, tmp / "hf")
        (out / "README.md").write_text(card or f"# {cfg.model_name}\n")
        return {"hf": str(out)}

    log_datasets(run_id, list(datasets))
    benchmarks = next((d for d in datasets if d.name == "benchmarks"), None)
    return _register(run_id, "model", pyfunc_model.__file__, model, tokenizer, cfg.model_name, list(cfg.aliases),
                     tags, _chat_signature(), hf_folder, benchmarks)


def _register(run_id: str, artifact: str, python_model: str, model: ModelRef, tokenizer: TokenizerRef, name: str,
              aliases: list[str], tags: Mapping[str, str], signature: Any = None,
              extra: Callable[[Path], dict[str, str]] | None = None,
              benchmarks: DatasetFacts | None = None) -> RegisteredModel:
    """Log a models-from-code pyfunc (`python_model`, the file; the model and tokenizer folders, and the folders
    `extra(tmp_dir)` writes, as artifacts; our `models/` package as code) into the run as `artifact`, register it
    as `name`, set its aliases and tags.

    A model whose weights and tokenizer are already a version of `name` (tag `model_sha256`) is not logged again:
    that version is returned, with the aliases set on it, so a rerun that changes nothing makes no new version."""
    content = f"{model.sha256}:{tokenizer.sha256}"
    client = MlflowClient()
    with registry_lock(name):
        found = find_version(name, content)
        if found is not None:
            for alias in aliases:
                client.set_registered_model_alias(name, alias, found)
            return RegisteredModel(name=name, version=found, model_uri=f"models:/{name}/{found}", aliases=aliases,
                                   reused=True)
        with tempfile.TemporaryDirectory(dir=workspace(), prefix="register-") as tmp:
            artifacts = {"model": model.path, "tokenizer": tokenizer.path, **(extra(Path(tmp)) if extra else {})}
            info = _log_model(run_id, artifact, python_model, artifacts, name, signature)
        version = info.registered_model_version
        for alias in aliases:
            client.set_registered_model_alias(name, alias, version)
        for k, v in {**tags, "model_sha256": content}.items():  # inside the lock: the next run finds it by this
            client.set_model_version_tag(name, version, metric_name(k), str(v))
    _log_model_scores(run_id, info.model_id, tags, benchmarks)
    return RegisteredModel(name=name, version=int(version), model_uri=f"models:/{name}/{version}", aliases=aliases)


def _log_model(run_id: str, artifact: str, python_model: str, artifacts: dict[str, str], name: str,
               signature: Any):
    with mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name=artifact,
            python_model=str(Path(python_model)),
            artifacts=artifacts,
            code_paths=[str(REPO_ROOT / "models")],
            pip_requirements=[f"torch=={_version('torch')}", f"tokenizers=={_version('tokenizers')}",
                              f"safetensors=={_version('safetensors')}", f"pydantic=={_version('pydantic')}"],
            registered_model_name=name,
            signature=signature,
        )


def _log_model_scores(run_id: str, model_id: str, tags: Mapping[str, str], benchmarks: DatasetFacts | None) -> None:
    """The version's eval scores as metrics of its logged model, against the benchmark dataset: MLflow 3 links
    the model to that dataset through them (the logged model's page lists its metrics by dataset)."""
    client = MlflowClient()
    for key, value in tags.items():
        if key.startswith("score."):
            client.log_metric(run_id, metric_name(key.removeprefix("score.")), float(value), model_id=model_id,
                              dataset_name=benchmarks and "benchmarks", dataset_digest=benchmarks and benchmarks.sha256[:20])


@contextmanager
def registry_lock(name: str) -> Iterator[None]:
    """One run at a time reads and writes the versions and aliases of `name` (two runs registering the same weights,
    or judging against the same champion, at once). Per machine, like every workspace lock."""
    with file_lock(workspace() / "locks" / f"registry-{metric_name(name)}.lock", f"registry {name}"):
        yield


def find_version(name: str, content: str) -> int | None:
    """The version of `name` tagged `model_sha256 = content` (the newest if several), or None."""
    client = MlflowClient()
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.model_sha256 = '{content}'")
    except MlflowException:
        return None
    return max((int(v.version) for v in found), default=None)


def alias_version(name: str, alias: str) -> tuple[int, dict[str, str]] | None:
    """(version, its tags) that `name@alias` points at; None when the model or the alias does not exist."""
    try:
        v = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return int(v.version), dict(v.tags)


def record_gate(name: str, version: int, aliases: list[str], champion_alias: str, promote: bool,
                tags: Mapping[str, str], description: str | None) -> None:
    """Write the gate's outcome on `version`: its aliases (`candidate`), the champion alias when promoted, the
    decision as tags and the version's description (unless None)."""
    client = MlflowClient()
    for alias in aliases:
        client.set_registered_model_alias(name, alias, str(version))
    if promote:
        client.set_registered_model_alias(name, champion_alias, str(version))
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), metric_name(k), str(v))
    if description is not None:
        client.update_model_version(name, str(version), description=description)


def _chat_signature():
    """Only the params (MLflow ignores params a signature does not list); no input schema, because `predict` takes
    strings, message lists and lists of conversations (`tasks/pyfunc_model.py`). top_k 0 and top_p 1 mean off."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    return ModelSignature(params=ParamSchema([
        ParamSpec("max_new_tokens", "long", 64), ParamSpec("temperature", "double", 0.0),
        ParamSpec("top_k", "long", 0), ParamSpec("top_p", "double", 1.0), ParamSpec("seed", "long", 0)]))


def download_model(uri: str, cache: Path) -> tuple[Path, Path]:
    """The model and tokenizer folders of a registered model (`models:/NAME@ALIAS` or `models:/NAME/VERSION`),
    downloaded once per store, name and version into `cache`. An unknown name, alias or version is a ValueError."""
    import yaml

    client = MlflowClient()
    name, _, ref = uri.removeprefix("models:/").partition("@")
    try:
        if ref:
            version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
    except MlflowException as e:
        raise ValueError(f"{uri}: no such registered model version ({e.message.splitlines()[0]})") from e
    import hashlib

    # The registry's own name for the version's files: another tracking server's "v1" is another folder.
    where = hashlib.sha256(f"{tracking_uri()}\0{version.source}\0{version.run_id}".encode()).hexdigest()[:12]
    dest = Path(cache) / f"{metric_name(name)}-v{version.version}-{where}"
    if not (dest / "_SUCCESS").exists():
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=str(dest))
        (dest / "_SUCCESS").write_text(uri + "\n")
    arts = yaml.safe_load((dest / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]
    return dest / arts["model"]["path"], dest / arts["tokenizer"]["path"]


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg).split("+")[0]


def register_classifier(run_id: str, model: ModelRef, tokenizer: TokenizerRef, name: str,
                        tags: Mapping[str, str]) -> RegisteredModel:
    """Log the classify stage's classifier (backbone + head folder, tokenizer; loaded by code, no pickles) into
    its run and register it as `name` with alias `candidate`: `predict` answers yes/no with a probability."""
    from tasks import pyfunc_classifier

    return _register(run_id, "classifier", pyfunc_classifier.__file__, model, tokenizer, name, ["candidate"], tags)


def register_reward_model(run_id: str, model: ModelRef, tokenizer: TokenizerRef, name: str,
                          tags: Mapping[str, str]) -> RegisteredModel:
    """Log the reward stage's model (trunk + scalar head folder, tokenizer; loaded by code, no pickles) into its run
    and register it as `name` with alias `candidate`: `predict` scores (prompt messages, answer) records."""
    from tasks import pyfunc_reward

    return _register(run_id, "reward_model", pyfunc_reward.__file__, model, tokenizer, name, ["candidate"], tags)


def run_records(run_id: str, files: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """What a pipeline run recorded, for its report (`tasks/report.py`): the parent run and every run nested under
    it (two levels: a model's eval nests under its stage's run), each as {name, params, metrics, tags, files}:
    `files` holds the text of the artifacts named for its run name ("" for the parent: `{"": ("results.md",), "data": ("manifest.json",)}`) that it has.
    An unknown run id is a ValueError."""
    client = MlflowClient()
    try:
        parent = client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"MLflow run {run_id}: not found in {tracking_uri()} ({e.message.splitlines()[0]})") from e
    runs = [parent] + _nested(client, parent.info.experiment_id, run_id, depth=2)
    return {"parent": _record(client, parent, files.get("", ())),
            "children": [_record(client, r, files.get(r.info.run_name, ())) for r in runs[1:]]}


def _nested(client: MlflowClient, experiment_id: str, run_id: str, depth: int) -> list:
    found = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", max_results=1000)
    return found + [r for child in found if depth > 1 for r in _nested(client, experiment_id, child.info.run_id, depth - 1)]


def _record(client: MlflowClient, run: Any, files: tuple[str, ...]) -> dict[str, Any]:
    rid = run.info.run_id
    present = {a.path for a in client.list_artifacts(rid)} if files else set()
    return {
        "run_id": rid, "name": run.info.run_name, "status": run.info.status, "start_ms": run.info.start_time,
        "end_ms": run.info.end_time, "params": dict(run.data.params), "metrics": dict(run.data.metrics),
        "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.parentRunId"},
        "files": {f: Path(client.download_artifacts(rid, f)).read_text() for f in files if f in present},
    }


def download_artifact(run_id: str, path: str, dst: Path) -> Path | None:
    """One artifact of a run (a chart) copied into `dst`; None when the run has no such artifact."""
    if path not in {a.path for a in MlflowClient().list_artifacts(run_id, str(Path(path).parent) if "/" in path else None)}:
        return None
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))


def log_dict(run_id: str, data: Mapping[str, Any], name: str) -> None:
    MlflowClient().log_dict(run_id, dict(data), name)
