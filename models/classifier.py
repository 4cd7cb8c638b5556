"""GPT-1's task head (Radford et al. 2018, section 3.2): a linear layer on the final hidden state of the last
token (the "extract" token), trained with the language-modelling loss on the same input as an auxiliary term:
L = L_task + lm_weight * L_LM. The loss itself is composed by the caller (`tasks/classify.py`).

Saved as one folder: the GPT exactly as `models.checkpoint.save_model` writes it (`model.safetensors` +
`config.json`, so `load_model` reads the fine-tuned backbone alone) and the head beside it (`head.safetensors`
with `weight` (K, C) and `bias` (K,), and `head.json`: the class labels, dropout and what the caller stored about
the input format). Safetensors only, never pickles.

Shapes: B batch, T time, C = n_embd, K classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from models.checkpoint import load_model, save_model
from models.gpt import GPT
from models.head_loss import chunked_head_loss

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"


class GPTClassifier(nn.Module):
    """A GPT and a linear head over its last token's final hidden state; `meta` travels with the saved head."""

    def __init__(self, gpt: GPT, labels: list[str], dropout: float = 0.1, meta: dict[str, Any] | None = None):
        super().__init__()
        assert len(labels) >= 2, f"a classifier needs at least two labels, got {labels}"
        self.gpt = gpt
        self.labels = list(labels)
        self.meta = dict(meta or {})
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(gpt.config.n_embd, len(labels))
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)  # as the GPT's own linear layers
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, last: torch.Tensor, lm_targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) right-padded ids, last (B,) the extract token's position in each row -> class logits (B, K),
        and the mean LM loss over lm_targets != -100 when lm_targets (B, T) is given (else None: no output head
        is run, so a pure task loss costs no (B, T, V) logits)."""
        h = self.gpt.hidden_states(idx)  # (B, T, C)
        pooled = h[torch.arange(idx.size(0), device=idx.device), last]  # (B, C)
        logits = self.head(self.dropout(pooled))  # (B, K)
        if lm_targets is None:
            return logits, None
        if self.gpt.config.loss_chunk:
            return logits, chunked_head_loss(h, self.gpt.lm_head.weight, lm_targets, self.gpt.config.loss_chunk)
        return logits, GPT.loss(self.gpt.lm_head(h), lm_targets)


def pair_input(passage: list[int], question: list[int], start: int, delimiter: int, extract: int,
               block_size: int) -> tuple[list[int], bool] | None:
    """GPT-1's input for a (passage, question) pair: `start passage delimiter question extract`, the question kept
    whole and the passage cut from the right to fit `block_size`. Returns (ids, whether the passage was cut), or
    None when the question alone does not fit."""
    budget = block_size - len(question) - 3  # start, delimiter, extract
    if budget < 1:
        return None
    return [start, *passage[:budget], delimiter, *question, extract], len(passage) > budget


def save_classifier(clf: GPTClassifier, out_dir: Path) -> Path:
    """Write the backbone (`save_model`), `head.safetensors` and `head.json` into out_dir; returns out_dir."""
    out_dir = save_model(clf.gpt, Path(out_dir))
    head = {"weight": clf.head.weight.detach().cpu().contiguous(), "bias": clf.head.bias.detach().cpu().contiguous()}
    save_file(head, str(out_dir / HEAD_WEIGHTS), metadata={"format": "pt"})
    info = {"labels": clf.labels, "dropout": clf.dropout.p, "meta": clf.meta}
    (out_dir / HEAD_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def load_classifier(model_dir: Path, device: str | torch.device = "cpu") -> GPTClassifier:
    """Rebuild the classifier saved by `save_classifier` (strict shapes; a missing file is a ValueError)."""
    model_dir = Path(model_dir)
    for name in (HEAD_WEIGHTS, HEAD_CONFIG):
        if not (model_dir / name).is_file():
            raise ValueError(f"not a classifier folder, missing {model_dir / name}")
    info = json.loads((model_dir / HEAD_CONFIG).read_text())
    clf = GPTClassifier(load_model(model_dir, device), info["labels"], info.get("dropout", 0.0), info.get("meta"))
    head = load_file(str(model_dir / HEAD_WEIGHTS), device=str(device))
    try:
        clf.head.load_state_dict(head, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{model_dir / HEAD_WEIGHTS} does not fit {HEAD_CONFIG} and config.json: {e}") from e
    return clf.to(device)
