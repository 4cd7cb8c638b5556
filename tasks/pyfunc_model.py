"""The registered model as MLflow loads it: code, not a pickle (MLflow "models from code").

The model's artifacts are the safetensors weights with their `config.json` and the tokenizer folder;
`predict` takes a list of prompts and returns the assistant's completions (greedy unless `params` says
otherwise: `max_new_tokens`, `temperature`, `top_k`, `top_p`).
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class GPTChatModel(PythonModel):
    def load_context(self, context):
        from tokenizers import Tokenizer

        from models.checkpoint import load_model

        self.model = load_model(context.artifacts["model"])
        self.model.eval()
        self.tok = Tokenizer.from_file(f"{context.artifacts['tokenizer']}/tokenizer.json")

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        from models.generate import generate

        params = params or {}
        prompts = list(model_input)
        ids = [[self.tok.token_to_id("<|user|>")] + self.tok.encode(p, add_special_tokens=False).ids
               + [self.tok.token_to_id("<|end|>"), self.tok.token_to_id("<|assistant|>")] for p in prompts]
        out = generate(self.model, ids, max_new_tokens=int(params.get("max_new_tokens", 64)),
                       temperature=float(params.get("temperature", 0.0)), top_k=params.get("top_k"),
                       top_p=params.get("top_p"), stop_ids=[self.tok.token_to_id("<|end|>")], seed=0)
        return [self.tok.decode(o) for o in out]


mlflow.models.set_model(GPTChatModel())
