"""Alignment stage: the SFT model aligned to preferences by the chosen method. Today one method, DPO on Ray Train
workers (`tasks/dpo.py`, config `align.dpo`); the reward model, PPO and GRPO join it as further methods.

In: the SFT `model/`, the tokenizer. Out: the method's stage folder (`model/`, curves, history). Run alone:
`gptflow align --model DIR --tokenizer DIR [--set dpo.steps=20]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.dpo import DPOConfig
from tasks.refs import ModelRef, RunLink, TokenizerRef


class AlignConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["dpo"] = Field("dpo", description="Alignment method.")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO / IPO on preference pairs (`tasks/dpo.py`).")


def align_model(cfg: AlignConfig, model: ModelRef, tokenizer: TokenizerRef, out_dir: Path, run: RunLink | None = None,
                progress_file: IO[str] | None = None) -> ModelRef:
    """The SFT `model` aligned by `cfg.method`; see the method's core for what its folder holds."""
    from tasks.dpo import train_dpo

    return train_dpo(cfg.dpo, model, tokenizer, out_dir, run, progress_file)
