"""The pipeline's configuration: one frozen config per stage, composed; dotted overrides; config files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.align import AlignConfig
from tasks.classify import ClassifyConfig
from tasks.data import DataConfig
from tasks.decontam import DecontamConfig
from tasks.evaluate import EvalConfig
from tasks.pretrain import PretrainConfig
from tasks.registry import RegistryConfig
from tasks.sft import SFTConfig
from tasks.stage import GptflowError
from tasks.tokenizer import TokenizerConfig

DAY_S = 24 * 3600.0


class TimeoutsConfig(BaseModel):
    """Wall-clock limits of the training and eval tasks (Prefect task timeouts), in seconds. Not part of any
    stage's key: changing a limit never reruns a finished stage. A stage past its limit fails its task, and a
    rerun resumes it from its last checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pretrain: float = Field(DAY_S, gt=0, description="Pretraining's limit in seconds (default one day).")
    sft: float = Field(DAY_S, gt=0, description="SFT's limit in seconds (default one day).")
    dpo: float = Field(DAY_S, gt=0, description="DPO's limit in seconds (default one day).")
    reward: float = Field(DAY_S, gt=0, description="The reward model's limit in seconds (default one day).")
    ppo: float = Field(DAY_S, gt=0, description="PPO's limit in seconds (default one day).")
    grpo: float = Field(DAY_S, gt=0, description="GRPO's limit in seconds (default one day).")
    classify: float = Field(DAY_S, gt=0, description="The classifier fine-tuning's limit in seconds (default one day).")
    eval: float = Field(DAY_S, gt=0, description="Each model's eval's limit in seconds (default one day).")


class PipelineConfig(BaseModel):
    """Every stage's own config, composed; each lives beside its stage's code."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = Field(description="The preset this config started from.")
    data: DataConfig = Field(default_factory=DataConfig, description="The data stage: crawl files to a clean, "
                             "deduplicated English corpus (datatrove).")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="The tokenizer stage: a BPE "
                                       "trained on the corpus (or GPT-2's), and the corpus packed into token shards.")
    pretrain: PretrainConfig = Field(description="Pretraining of the GPT on the token shards (Ray Train).")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tuning on chat data.")
    align: AlignConfig = Field(default_factory=AlignConfig, description="The alignment methods run side by side "
                               "from the SFT model (DPO, reward model + PPO, GRPO) and each one's config.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="The benchmarks every model of the run is "
                             "scored on (lm-eval).")
    decontam: DecontamConfig = Field(default_factory=DecontamConfig, description="The 13-gram check of the "
                                     "benchmarks against this run's training data, before promotion (its data_dir "
                                     "and tasks follow `eval`).")
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig, description="GPT-1 style task fine-tuning "
                                     "(run when run_classify is on).")
    run_classify: bool = Field(False, description="Also fine-tune the pretrained model as a BoolQ classifier (GPT-1 style, `classify`), registered as classify.model_name. Off by default: it would add ~12 % (~14 s) to the tiny pipeline.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="The registered model, its "
                                     "aliases and the eval gate that moves `champion`.")
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig, description="Wall-clock limits of the "
                                     "training and eval tasks; each preset sets them from its expected times.")

    @property
    def registration(self) -> RegistryConfig:
        """`registry` with its model name filled in: `gpt-<preset>` unless the user named it."""
        return self.registry.model_copy(update={"model_name": self.registry.model_name or f"gpt-{self.preset}"})


def parse_value(text: str) -> Any:
    """`--set` values: JSON when they parse as JSON (numbers, booleans, lists, null), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise GptflowError(f"malformed --set '{item}': expected key=value, e.g. pretrain.lr=3e-4")
        out[key.strip()] = parse_value(value)
    return out


def flatten_keys(d: dict[str, Any], prefix: str = "", model: type[BaseModel] | None = None) -> dict[str, Any]:
    """Nested sections to dotted keys. With `model`, only config sections (pydantic models) are opened: a
    mapping value such as `data.text_sources` ({path: weight}, paths with dots) stays one value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        section = _section(model, k) if model is not None else None
        if isinstance(v, dict) and v and (model is None or section is not None):
            out.update(flatten_keys(v, f"{prefix}{k}.", section))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _section(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The config class at a (possibly dotted) key of `model`, or None when the key names a plain field."""
    for part in key.split("."):
        field = model.model_fields.get(part)
        kind = field.annotation if field is not None else None
        if not (isinstance(kind, type) and issubclass(kind, BaseModel)):
            return None
        model = kind
    return model


def read_config_file(path: str | Path, model: type[BaseModel] | None = None) -> dict[str, Any]:
    """A YAML or JSON file of (nested or dotted) keys, flattened into dotted overrides (of `model`'s fields)."""
    path = Path(path)
    if not path.is_file():
        raise GptflowError(f"config file does not exist: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GptflowError(f"config file {path} is not valid YAML/JSON: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GptflowError(f"config file {path} must hold a mapping of keys to values")
    return flatten_keys(data, model=model)


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """Set dotted keys in a nested dict; a key that does not exist is an error (no silent typos)."""
    out = json.loads(json.dumps(base))
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                known = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
                raise GptflowError(f"unknown {where} key '{dotted}': '{'.'.join(parts[: i + 1])}' does not exist; "
                                   f"known keys here: {known}")
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return out


def validate(cls: type[BaseModel], data: dict[str, Any], where: str) -> BaseModel:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise GptflowError(f"invalid {where}: {problems}") from None
