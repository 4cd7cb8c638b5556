"""gptflow models: the GPT network, generation, checkpoints, Hugging Face export and a compute planner."""
