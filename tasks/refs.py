"""Typed references that stages hand each other: where an output is, its content hash, its counts, and the
manifest it came from. Never the data itself.

A stage core returns a ref with `path` (its main output), its `counts`, `metrics` and named `files`;
`tasks.stage.run_stage` seals it (the sha256 of every path, the stage key, the manifest) and writes it into
`manifest.json` before `_SUCCESS`. A finished stage folder is read back with `load_ref`, so a cached stage
returns the same ref as the run that made it. The next stage's key hashes `sha256`, never the path: moving a
workspace keeps its keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class Ref(BaseModel):
    """What every stage output has. Fields after `files` are filled in by `run_stage`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="The main output: a file or a folder.")
    sha256: str = Field("", description="Content hash of `path` (a folder: of its files' names and hashes).")
    counts: dict[str, Any] = Field(default_factory=dict, description="Records in, kept, dropped; tokens; steps.")
    metrics: dict[str, float] = Field(default_factory=dict, description="`<scope>/<name>` metrics of the stage.")
    files: dict[str, str] = Field(default_factory=dict, description="Other named outputs (hashed in the manifest).")
    artifacts: list[str] = Field(default_factory=list, description="Names in `files` worth logging to MLflow.")
    stage: str = ""
    key: str = ""
    manifest: str = Field("", description="The `manifest.json` this ref was sealed into.")
    seconds: float = 0.0
    cached: bool = Field(False, description="True when this call reused a finished folder.")
    run_id: str = Field("", description="The MLflow run of the stage call that returned this ref (not in any key): "
                                        "the evaluation of a model nests under it.")

    # Recorded as an MLflow dataset input of the stages that consume it (lineage), under this name.
    dataset_name: ClassVar[str | None] = None

    @property
    def dir(self) -> Path:
        """The stage folder."""
        return Path(self.manifest).parent

    def file(self, name: str) -> Path:
        return Path(self.files[name])

    def profile(self) -> dict[str, Any]:
        """What an MLflow dataset input shows about this output."""
        return {}


class InputRef(Ref):
    """A file or folder the user gave (a crawl file, SFT data, the benchmark folder), or an fsspec URL.
    `size` is what the filesystem said, so nobody asks a server twice."""

    size: int | None = None


class CorpusRef(Ref):
    """The data stage's clean documents: `path` is the folder of `*.jsonl.gz` shards."""

    dataset_name: ClassVar[str | None] = "corpus"

    @property
    def docs(self) -> int | None:
        """Documents kept; None for a folder given by hand (`gptflow tokenizer --input`), which has no counts."""
        return self.counts.get("totals", {}).get("docs_out")

    def profile(self) -> dict[str, Any]:
        return {"docs": self.docs, "chars": self.counts.get("totals", {}).get("chars_out")}


class ShardsRef(Ref):
    """Packed token shards: `path` is the folder with `index.json` and the `.bin` shards."""

    dataset_name: ClassVar[str | None] = "token-shards"

    def index(self) -> dict[str, Any]:
        return json.loads((Path(self.path) / "index.json").read_text())

    def profile(self) -> dict[str, Any]:
        splits = self.index()["splits"]
        return {f"{split}_tokens": v["tokens"] for split, v in splits.items()}


class TokenizerRef(Ref):
    """A saved tokenizer folder (`tokenizer.json`) and the token shards written with it."""

    shards: ShardsRef | None = Field(None, description="None for a tokenizer given alone (`gptflow sft --tokenizer`).")

    @property
    def tokenizer_json(self) -> Path:
        return Path(self.path) / "tokenizer.json"


class ModelRef(Ref):
    """A model folder: `model.safetensors` and `config.json` (see `models/checkpoint.py`)."""


class EvalReport(Ref):
    """Benchmark scores: `path` is lm-eval's results JSON; `files["table"]` the Markdown table."""

    @property
    def table(self) -> str:
        return self.file("table").read_text()

    def scores(self) -> dict[str, float]:
        """The headline numbers (no standard errors), for tags and the registry."""
        return {k.removeprefix("eval/"): v for k, v in self.metrics.items() if "stderr" not in k}

    def tasks(self) -> list[str]:
        """The benchmarks scored, in the order of the metrics."""
        return list(dict.fromkeys(k.split("/")[0] for k in self.scores()))


class ContaminationReport(Ref):
    """Benchmark items found in this run's training data: `path` is `contamination.json` (`eval/decontam.py`);
    `files["table"]` the Markdown table."""

    def report(self) -> dict[str, Any]:
        return json.loads(Path(self.path).read_text())

    def contaminated(self) -> dict[str, list[int]]:
        """The contaminated doc_ids of each task (a doc_id is the record's index in the task's data file)."""
        return {task: r["doc_ids"] for task, r in self.report()["tasks"].items()}

    def fractions(self) -> dict[str, float]:
        """The contaminated fraction of each task's items."""
        return {task: r["fraction"] for task, r in self.report()["tasks"].items()}

    def table(self) -> str:
        return self.file("table").read_text()


class RunLink(BaseModel):
    """Where a stage's worker processes log their per-step metrics: the stage's MLflow run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str | None = None
    tracking_uri: str | None = None

    def logger(self, rank: int = 0) -> NullLogger:
        """Rank 0 logs to the run (`tasks.tracking.MetricLogger`); other ranks, and runs without a run id, get a
        `NullLogger`, so they never branch on "is logging on" and never import mlflow."""
        if rank != 0 or not self.run_id:
            return NullLogger()
        from tasks.tracking import MetricLogger

        return MetricLogger(self.run_id, self.tracking_uri)


class NullLogger:
    """The metric logger that logs nothing: `log(metrics, step)` like `tasks.tracking.MetricLogger`."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass


class RegisteredModel(BaseModel):
    """A model version in the MLflow registry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: int
    model_uri: str
    aliases: list[str]
    reused: bool = Field(False, description="True when the same weights and tokenizer were already this version.")


REF_TYPES: dict[str, type[Ref]] = {
    cls.__name__: cls
    for cls in (Ref, InputRef, CorpusRef, ShardsRef, TokenizerRef, ModelRef, EvalReport, ContaminationReport)
}


def dump_ref(ref: Ref) -> dict[str, Any]:
    """The ref as the manifest stores it: its type name and fields (`cached` is a property of one call)."""
    return {"type": type(ref).__name__, **ref.model_dump(mode="json", exclude={"cached"})}


def load_ref(data: dict[str, Any]) -> Ref:
    data = dict(data)
    return REF_TYPES[data.pop("type")].model_validate(data)
