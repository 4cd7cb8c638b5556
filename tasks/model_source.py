"""Where a `--model` comes from: one function for `gptflow sft|align|eval|chat`.

    our model folder        model.safetensors + our config.json (models/checkpoint.py)
    a Hugging Face folder   GPT2LMHeadModel / LlamaForCausalLM (config.json with `model_type`, safetensors):
                            imported once (models/hf_import.py) into the workspace, keyed by its content hash
    models:/NAME@ALIAS      a registered model (or models:/NAME/VERSION): its artifacts downloaded once per version

The tokenizer is `--tokenizer` when given, else the one that comes with the model: a registered model's
tokenizer artifact, or a `tokenizer.json` in the folder (or in a `tokenizer/` folder inside or beside it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from infra.env import resolve_path, workspace
from tasks.stage import GptflowError, file_sha256

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "config.json")


def resolve_model(spec: str, tokenizer: str | None = None) -> tuple[Path, Path | None]:
    """(our model folder, tokenizer folder or None) for a `--model` value and an optional `--tokenizer`."""
    if spec.startswith("models:/"):
        from tasks.tracking import download_model

        try:
            model, tok = download_model(spec, workspace() / "cache" / "registered")
        except ValueError as e:
            raise GptflowError(str(e)) from e
    else:
        path = resolve_path(spec)
        if not path.exists():
            raise GptflowError(f"model folder does not exist: {spec}")
        if not (path / "config.json").is_file():
            raise GptflowError(f"--model {spec}: not a model folder (no config.json), nor models:/NAME@ALIAS")
        model = import_hf_cached(path) if is_hf_folder(path) else path
        tok = find_tokenizer(path)
    if tokenizer:
        tok = resolve_path(tokenizer)
        if not tok.exists():
            raise GptflowError(f"tokenizer folder does not exist: {tokenizer}")
    return model, tok


def is_hf_folder(path: Path) -> bool:
    """A transformers config names its `model_type`; ours (a GPTConfig) does not."""
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise GptflowError(f"{path / 'config.json'}: not JSON ({e})") from e


def import_hf_cached(hf_dir: Path) -> Path:
    """Our model folder for a Hugging Face folder, imported on first use into `<workspace>/cache/hf_import/<hash>`
    (the hash of its config and weight files), so a second run reads it instead of converting again."""
    from models.hf_import import import_hf

    files = sorted({*hf_dir.glob("*.safetensors"), *(hf_dir / f for f in HF_WEIGHTS if (hf_dir / f).is_file())})
    key = file_sha256_many(files)[:16]
    out = workspace() / "cache" / "hf_import" / key
    if (out / "_SUCCESS").exists():
        return out
    tmp = out.with_name(key + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        import_hf(hf_dir, tmp)
    except ValueError as e:  # an unsupported config, unmapped weights, a pickle: one line naming the file
        raise GptflowError(str(e)) from e
    (tmp / "_SUCCESS").write_text(str(hf_dir) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def file_sha256_many(files: list[Path]) -> str:
    """One hash of several files' names and contents."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def find_tokenizer(model_dir: Path) -> Path | None:
    for cand in (model_dir, model_dir / "tokenizer", model_dir.parent / "tokenizer"):
        if (cand / "tokenizer.json").is_file():
            return cand
    return None
