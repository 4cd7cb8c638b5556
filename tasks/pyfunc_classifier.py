"""The registered BoolQ classifier as MLflow loads it: code, not a pickle (MLflow "models from code").

Artifacts: the classifier folder (`models/classifier.py`: backbone + head, safetensors) and the tokenizer folder.
`predict` takes a list of records with `passage` and `question` and returns, for each,
the label ("yes"/"no") and its probability, with the input built as the classify stage built it (`head.json`).

    clf = mlflow.pyfunc.load_model("models:/gpt-boolq@candidate")
    clf.predict([{"passage": "...", "question": "is it ..."}])  # [{"label": "yes", "probability": 0.71}]
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class GPTClassifierModel(PythonModel):
    def load_context(self, context):
        from tokenizers import Tokenizer

        from models.classifier import load_classifier

        self.clf = load_classifier(context.artifacts["model"]).eval()
        self.tok = Tokenizer.from_file(f"{context.artifacts['tokenizer']}/tokenizer.json")
        self.tok.encode_special_tokens = True  # special-token strings inside a passage are text

    def predict(self, context, model_input: list[dict[str, str]], params: dict[str, Any] | None = None):
        """[{"passage", "question"}, ...] -> [{"label": "yes" or "no", "probability": float}, ...]."""
        import torch

        from models.classifier import pair_input

        records = list(model_input)
        meta = self.clf.meta
        start, delim, extract = (self.tok.token_to_id(meta[k]) for k in ("start", "delimiter", "extract"))
        out = []
        for r in records:
            passage, question = (self.tok.encode(r[k], add_special_tokens=False).ids for k in ("passage", "question"))
            pair = pair_input(passage, question, start, delim, extract, meta["block_size"])
            if pair is None:
                raise ValueError(f"question too long for the model's context of {meta['block_size']} tokens")
            with torch.no_grad():
                logits, _ = self.clf(torch.tensor([pair[0]]), torch.tensor([len(pair[0]) - 1]))
            p = torch.softmax(logits.float(), -1)[0]
            k = int(p.argmax())
            out.append({"label": self.clf.labels[k], "probability": float(p[k])})
        return out


mlflow.models.set_model(GPTClassifierModel())
