"""gptflow models: the GPT network, generation, checkpoints, Hugging Face export and a compute planner."""

from models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
