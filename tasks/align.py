"""Alignment: the methods that start from the SFT model, each its own stage and branch of the pipeline.

`align.methods` lists the branches to run; each starts from the same SFT model and is evaluated beside the others
(`flows/pipeline.py`): DPO on preference pairs (`tasks/dpo.py`), the InstructGPT chain of a reward model
(`tasks/reward.py`) and PPO against it (`tasks/ppo.py`), and GRPO on prompts whose answers code checks
(`tasks/grpo.py`). This module holds only their configs, so that one `align` section of the pipeline config
carries every method's options.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.dpo import DPOConfig
from tasks.grpo import GRPOConfig
from tasks.ppo import PPOConfig
from tasks.reward import RewardConfig

Method = Literal["dpo", "ppo", "grpo"]


class AlignConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    methods: tuple[Method, ...] = Field(
        ("dpo", "ppo"), min_length=1,
        description="Alignment methods, each a branch from the same SFT model, evaluated side by side: dpo, ppo "
        "(trains the reward model first), grpo. The first one's model gets the registry's `candidate` alias; every "
        "one gets an alias of its own name.")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO / IPO on preference pairs (`tasks/dpo.py`).")
    reward: RewardConfig = Field(default_factory=RewardConfig,
                                 description="The reward model PPO trains against (`tasks/reward.py`).")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO against the reward model (`tasks/ppo.py`).")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig,
                             description="GRPO on prompts whose answers code checks (`tasks/grpo.py`).")
