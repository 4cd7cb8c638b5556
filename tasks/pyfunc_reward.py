"""The registered reward model as MLflow loads it: code, not a pickle (MLflow "models from code").

Artifacts: the reward model folder (`models/reward.py`: trunk + scalar head, safetensors) and the tokenizer folder.
`predict` takes records `{"messages": [prompt turns, ending with the user's], "answer": "the reply"}` and returns
each reply's scalar reward, the row built as the reward stage built it (`tasks/reward.py`): the chat template, the
prompt's oldest tokens cut when the row is longer than the context, the score read at the reply's `<|end|>`.

    rm = mlflow.pyfunc.load_model("models:/gpt-reward@candidate")
    rm.predict([{"messages": [{"role": "user", "content": "Hi"}], "answer": "Hello!"}])  # [{"reward": 0.42}]
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class RewardModelPyfunc(PythonModel):
    def load_context(self, context):
        from tokenizers import Tokenizer

        from models.reward import load_reward_model

        self.rm = load_reward_model(context.artifacts["model"])
        self.tok = Tokenizer.from_file(f"{context.artifacts['tokenizer']}/tokenizer.json")
        self.tok.encode_special_tokens = True  # special-token strings inside a message are text

    def _ids(self, messages: list[dict[str, str]]) -> list[int]:
        """`<|role|>content<|end|>` per turn: the ids `tasks.chat.render` gives."""
        from models.tokens import END, role_token

        ids: list[int] = []
        for m in messages:
            role = self.tok.token_to_id(role_token(m["role"]))
            if role is None:
                raise ValueError(f"unknown role {m['role']!r}: the tokenizer has no {role_token(m['role'])}")
            ids += [role, *self.tok.encode(m["content"], add_special_tokens=False).ids, self.tok.token_to_id(END)]
        return ids

    def predict(self, context, model_input: list[dict[str, Any]], params: dict[str, Any] | None = None):
        """[{"messages", "answer"}, ...] -> [{"reward": float}, ...]."""
        import torch

        block_size = self.rm.config.block_size
        out = []
        for i, r in enumerate(model_input):
            prompt, reply = self._ids(r["messages"]), self._ids([{"role": "assistant", "content": r["answer"]}])
            if len(reply) >= block_size:
                raise ValueError(f"record {i}: the answer ({len(reply)} tokens) does not fit the context of {block_size}")
            row = prompt[max(0, len(prompt) + len(reply) - block_size):] + reply  # the oldest prompt tokens cut
            with torch.no_grad():
                out.append({"reward": float(self.rm(torch.tensor([row]), torch.tensor([len(row)]))[0])})
        return out


mlflow.models.set_model(RewardModelPyfunc())
