"""The registered model as MLflow loads it: code, not a pickle (MLflow "models from code").

The model's artifacts are the safetensors weights with their `config.json`, the tokenizer folder, and (for the
chat model) the same model in Hugging Face format under `hf/`, which `predict` does not use.
`predict` takes a string, a list of strings (each one user message), one conversation (a list of
`{"role", "content"}` messages), `{"messages": [...]}` (what `mlflow models serve` gets as
`{"inputs": {"messages": [...]}}`), or a list of conversations, and returns the assistant's answers: a string
for one conversation, else a list. `predict_stream` takes one of them (a string, a `{"messages": [...]}` dict,
or a conversation wrapped in a list: MLflow passes streams one input) and yields the answer in chunks of text
as it is sampled. Greedy unless `params` says otherwise: `max_new_tokens`, `temperature`, `top_k`, `top_p`,
`seed`. A conversation longer than the context is cut by `tasks/chat_session.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
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

    # No type hint on the input: MLflow would infer a schema from it and reject the other accepted shapes.
    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        from tasks.chat_session import as_conversations

        convos, single = as_conversations(_unwrap(model_input))
        answers = ["".join(self._stream(c, params)) for c in convos]
        return answers[0] if single else answers

    def predict_stream(self, context, model_input, params: dict[str, Any] | None = None) -> Iterator[str]:
        from tasks.chat_session import as_conversations

        convos, _ = as_conversations(_unwrap(model_input))
        if len(convos) != 1:
            raise ValueError(f"predict_stream answers one conversation; got {len(convos)}")
        yield from self._stream(convos[0], params)

    def _stream(self, messages, params: dict[str, Any] | None) -> Iterator[str]:
        from tasks.chat_session import Sampling, stream_answer

        p = params or {}
        opts = Sampling(max_tokens=int(p.get("max_new_tokens", 64)), temperature=float(p.get("temperature", 0.0)),
                        top_k=int(p.get("top_k") or 0) or None, top_p=float(p.get("top_p") or 1.0),
                        seed=int(p.get("seed", 0)))
        return stream_answer(self.model, self.tok, messages, opts)


def _unwrap(data):
    """Plain Python lists, dicts and strings from what MLflow's serving hands over: a pandas frame (a JSON list of
    records), or numpy arrays (`{"inputs": {"messages": [...]}}` becomes `{"messages": array([...])}`)."""
    if hasattr(data, "to_dict"):
        cols = list(data.columns)
        data = data[cols[0]].tolist() if len(cols) == 1 else data.to_dict(orient="records")
    if hasattr(data, "tolist"):  # a numpy array or scalar
        data = data.tolist()
    if isinstance(data, dict):
        return {k: _unwrap(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_unwrap(v) for v in data]
    return data


mlflow.models.set_model(GPTChatModel())
