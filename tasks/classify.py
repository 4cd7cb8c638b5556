"""Classify stage: GPT-1 style supervised fine-tuning (Radford et al. 2018, section 3.2) on BoolQ (yes/no).

In: a pretrained `model/` folder, the tokenizer, BoolQ records (`passage`, `question`, `label` 0/1 or `answer`
true/false; or llm-foundry's `query` "Passage: ...\\nQuestion: ...?" with `choices` ["no", "yes"] and `gold`).
Out: `model/` (the GPT and a linear head, `models/classifier.py`), `history.json`, `classify.png`, and held-out
accuracy beside the majority-class baseline. Run alone: `gptflow classify --model DIR --tokenizer DIR`.

- Input, as GPT-1's traversal-style input: `<|endoftext|> passage <|end|> question <|assistant|>`. The
  start token is the document boundary the model saw in pretraining; `<|end|>` is the delimiter and
  `<|assistant|>` the extract token whose final hidden state feeds the head. Both are reserved tokens that a base
  model never saw, like GPT-1's randomly initialised delimiter and extract tokens, and the fine-tuning learns them.
- Truncation: the question is kept whole and the passage is cut from the right (its end is dropped) to fit
  `block_size`: BoolQ passages are Wikipedia paragraphs that open with their topic. A record whose question
  alone does not fit is skipped and counted (`dropped_question_too_long`).
- Loss: L = L_task + lm_weight * L_LM, L_task the cross-entropy of the head over {no, yes}, L_LM the mean
  next-token loss over the passage's and question's tokens (the special tokens are not targets).
- Split: one file holds both parts. After a shuffle with `seed`, the first `held_out` fraction is held out and
  the rest trains. The majority baseline predicts the train part's majority label on the held-out part.
- Runs in the driver process on one device (CPU here): the task models are small; SFT on Ray Train workers is
  the SFT stage's.

torch is imported inside the functions: the CLI and the presets import `ClassifyConfig`.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from infra.env import resolve_path
from infra.jsonl import JsonlError, numbered_jsonl
from models.tokens import END, EOT, PAD, role_token
from tasks.plots import plot_classify
from tasks.refs import ModelRef, TokenizerRef
from tasks.stage import GptflowError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LABELS = ["no", "yes"]  # label 0 = no, 1 = yes (BoolQ's and lm-eval's order)
START, DELIMITER, EXTRACT = EOT, END, role_token("assistant")
IGNORE = -100


class ClassifyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field("data/benchmarks/boolq.jsonl.gz", description="BoolQ JSONL (repo-relative or absolute). The bundled file is the eval stage's BoolQ (200 validation records).")
    held_out: float = Field(0.2, gt=0, lt=1, description="Fraction of the records held out for accuracy and loss (after a seeded shuffle).")
    max_examples: int | None = Field(None, ge=2, description="Use at most this many records (after the shuffle, before the split); None: all.")
    lm_weight: float = Field(0.5, ge=0, description="lambda in L = L_task + lambda * L_LM (paper: 0.5; 0 turns the auxiliary LM loss off).")
    epochs: int = Field(3, ge=1, description="Passes over the train part (paper: 3).")
    steps: int | None = Field(None, ge=1, description="Optimizer steps; None: `epochs` passes over the train part.")
    batch_size: int = Field(32, ge=1, description="Records per step (paper: 32).")
    lr: float = Field(6.25e-5, gt=0, description="Peak learning rate (paper: 6.25e-5).")
    warmup: float = Field(0.002, ge=0, lt=1, description="Fraction of steps of linear warmup, then linear decay to 0 (paper: 0.2%).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay on matrices (paper: 0.01).")
    head_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the extract token's hidden state before the head (paper: 0.1).")
    eval_every: int = Field(50, ge=1, description="Measure held-out loss and accuracy every N steps.")
    seed: int = Field(1337, description="Shuffles, splits and samples the records; initialises the head.")
    model_name: str = Field("gpt-boolq", description="Registered model name of the classifier in the MLflow registry.")


# ---------------------------------------------------------------------------------------------- records


def boolq_record(r: dict[str, Any], where: str) -> dict[str, Any]:
    """{passage, question, label 0/1} from one record of a known BoolQ layout; a ValueError names `where`."""
    if "query" in r:  # llm-foundry / the shared folder's full validation file
        from eval.convert import BenchmarkDataError, convert_boolq

        try:
            return convert_boolq(r, where)
        except (BenchmarkDataError, KeyError, TypeError) as e:
            raise GptflowError(f"{where}: {e}") from e
    if "passage" not in r or "question" not in r:
        raise GptflowError(f"{where}: not a BoolQ record: needs 'passage' and 'question' (or 'query'), has {sorted(r)}")
    label = r.get("label", r.get("answer"))
    if label not in (0, 1):  # true/false compare equal to 1/0
        raise GptflowError(f"{where}: field 'label' (0/1) or 'answer' (true/false) missing or invalid: {label!r}")
    if not isinstance(r["passage"], str) or not isinstance(r["question"], str):
        raise GptflowError(f"{where}: fields 'passage' and 'question' must be strings")
    return {"passage": r["passage"], "question": r["question"], "label": int(label)}


def read_boolq(path: Path) -> list[dict[str, Any]]:
    """Every record of a BoolQ JSONL file; a bad line or record is an error naming the file and line."""
    if not path.is_file():
        raise GptflowError(f"classification data file does not exist: {path}")
    try:
        return [boolq_record(r, f"{path}:{n}") for n, r in numbered_jsonl(path)]
    except JsonlError as e:
        raise GptflowError(str(e)) from e


def split_records(records: list, held_out: float, seed: int, max_examples: int | None) -> tuple[list, list]:
    """(train, held-out): a shuffle with `seed`, at most `max_examples`, the first `held_out` fraction held out."""
    records = list(records)
    random.Random(seed).shuffle(records)
    records = records[:max_examples]
    n_held = max(1, round(len(records) * held_out))
    if len(records) - n_held < 1:
        raise GptflowError(f"too few records to split: {len(records)} with held_out={held_out}")
    return records[n_held:], records[:n_held]


# ---------------------------------------------------------------------------------------------- encoding


def encode(records: list[dict], tok, block_size: int, counts: dict[str, int]) -> list[tuple[list[int], int]]:
    """(ids, label) rows in the GPT-1 input format, the passage cut from the right to fit `block_size`;
    `counts` gets `passages_truncated` and `dropped_question_too_long`."""
    from models.classifier import pair_input
    from tasks.bpe import text_encoder

    enc = text_encoder(tok)  # a passage that contains "<|end|>" is text, not our delimiter
    start, delim, extract = (_special(tok, t) for t in (START, DELIMITER, EXTRACT))
    rows = []
    for r in records:
        passage, question = (enc.encode(r[k], add_special_tokens=False).ids for k in ("passage", "question"))
        pair = pair_input(passage, question, start, delim, extract, block_size)
        if pair is None:
            counts["dropped_question_too_long"] += 1
            continue
        counts["passages_truncated"] += pair[1]
        rows.append((pair[0], r["label"]))
    return rows


def _special(tok, token: str) -> int:
    tid = tok.token_to_id(token)
    if tid is None:
        raise GptflowError(f"the tokenizer has no {token} token (gptflow tokenizers reserve it)")
    return tid


def make_batch(rows: list[tuple[list[int], int]], pad_id: int, special: set[int]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T), the extract positions (B,), LM targets (B, T) (next token where it is text,
    else ignored) and labels (B,). Right padding leaves each row's attention unchanged under a causal mask."""
    import torch

    T = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(ids) - 1] = torch.tensor([t if t not in special else IGNORE for t in ids[1:]])
    last = torch.tensor([len(ids) - 1 for ids, _ in rows])
    labels = torch.tensor([label for _, label in rows])
    return x, last, y, labels


# ---------------------------------------------------------------------------------------------- the stage


def held_out_metrics(clf, rows: list, pad_id: int, special: set[int], batch_size: int) -> dict[str, float]:
    """Mean task loss, accuracy and LM loss (per text token) over `rows`, in evaluation mode."""
    import torch
    import torch.nn.functional as F

    clf.eval()
    task, lm, lm_n, correct = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            x, last, y, labels = make_batch(rows[i : i + batch_size], pad_id, special)
            logits, lm_loss = clf(x, last, y)
            task += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
            k = int((y != IGNORE).sum())
            lm, lm_n = lm + lm_loss.item() * k, lm_n + k
    clf.train()
    return {"task_loss": task / len(rows), "acc": correct / len(rows), "lm_loss": lm / max(lm_n, 1)}


def finetune_classifier(cfg: ClassifyConfig, model: ModelRef, tokenizer: TokenizerRef, out_dir: Path) -> ModelRef:
    """Fine-tune `model` with a yes/no head on `cfg.data`; save the classifier, its history and chart.

    Args:
        cfg: the stage's config; `cfg.data` is resolved as `infra.env.resolve_path` resolves a user path.
        model: the pretrained model folder (the backbone).
        tokenizer: the tokenizer folder (its `<|endoftext|>`, `<|end|>`, `<|assistant|>` and `<|pad|>`).
        out_dir: the stage folder: `model/`, `history.json`, `classify.png`.

    Returns:
        The classifier folder (`models.classifier.load_classifier` reads it), with the records' counts, held-out
        accuracy before and after beside the majority baseline, held-out task loss before and after, and lambda.
    """
    import torch

    from models.checkpoint import load_model
    from models.classifier import GPTClassifier, save_classifier
    from tasks.bpe import load_tokenizer

    torch.manual_seed(cfg.seed)
    gpt = load_model(Path(model.path))
    tok = load_tokenizer(Path(tokenizer.path))
    data = resolve_path(cfg.data)
    records = read_boolq(data)
    train_recs, held_recs = split_records(records, cfg.held_out, cfg.seed, cfg.max_examples)
    counts = {"records": len(records), "passages_truncated": 0, "dropped_question_too_long": 0}
    train, held = encode(train_recs, tok, gpt.config.block_size, counts), encode(held_recs, tok, gpt.config.block_size, counts)
    if not train or not held:
        raise GptflowError(f"{data}: no usable records left in the train ({len(train)}) or held-out ({len(held)}) part")
    majority = int(2 * sum(label for _, label in train) >= len(train))
    counts |= {"train": len(train), "held_out": len(held), "train_yes": sum(label for _, label in train),
               "held_out_yes": sum(label for _, label in held)}
    meta = {"start": START, "delimiter": DELIMITER, "extract": EXTRACT, "truncate": "passage from the right",
            "block_size": gpt.config.block_size}
    clf = GPTClassifier(gpt, LABELS, cfg.head_dropout, meta)
    pad_id = _special(tok, PAD)
    special = {_special(tok, t) for t in (START, DELIMITER, EXTRACT, PAD)}
    history = _train(cfg, clf, train, held, pad_id, special)
    save_classifier(clf, out_dir / "model")
    (out_dir / "history.json").write_text(json.dumps(history))
    baseline = sum(label == majority for _, label in held) / len(held)
    plot_classify(history, baseline, out_dir / "classify.png", f"GPT-1 fine-tuning on BoolQ (lambda={cfg.lm_weight})")
    before, after = history["held_out"][0], history["held_out"][-1]
    metrics = {"classify/heldout_acc_before": before["acc"], "classify/heldout_acc": after["acc"],
               "classify/majority_acc": baseline, "classify/heldout_task_loss_before": before["task_loss"],
               "classify/heldout_task_loss": after["task_loss"], "classify/heldout_lm_loss_before": before["lm_loss"],
               "classify/heldout_lm_loss": after["lm_loss"], "classify/lm_weight": cfg.lm_weight,
               "classify/final_train_loss": history["train"][-1][1]}
    files = {"model": out_dir / "model", "history": out_dir / "history.json", "plot": out_dir / "classify.png"}
    return ModelRef(path=str(files["model"]), counts=counts | {"steps": len(history["train"])}, metrics=metrics,
                    artifacts=["plot", "history"], files={k: str(v) for k, v in files.items()})


def _train(cfg: ClassifyConfig, clf, train: list, held: list, pad_id: int, special: set[int]) -> dict[str, list]:
    """AdamW, linear warmup then linear decay to 0 (GPT-1's schedule), epochs of shuffled batches; returns the
    history: train [step, L, L_task, L_LM] and held-out metrics at step 0, every `eval_every` and the end."""
    import torch
    import torch.nn.functional as F

    steps = cfg.steps or cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    warmup = max(1, round(cfg.warmup * steps))
    opt = clf.gpt.configure_optimizer(cfg.lr, cfg.weight_decay)
    opt.add_param_group({"params": [clf.head.weight], "weight_decay": cfg.weight_decay})
    opt.add_param_group({"params": [clf.head.bias], "weight_decay": 0.0})
    rng = random.Random(cfg.seed)
    order: list[int] = []
    history: dict[str, list] = {"train": [], "held_out": [{"step": 0, **held_out_metrics(clf, held, pad_id, special, cfg.batch_size)}]}
    clf.train()
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(step / warmup, max(0.0, (steps - step + 1) / max(1, steps - warmup + 1)))
        if len(order) < cfg.batch_size:  # a new epoch: the rest of this one, then a fresh shuffle
            fresh = list(range(len(train)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = [train[i] for i in order[: cfg.batch_size]], order[cfg.batch_size :]
        x, last, y, labels = make_batch(batch, pad_id, special)
        logits, lm_loss = clf(x, last, y if cfg.lm_weight > 0 else None)
        task_loss = F.cross_entropy(logits.float(), labels)
        loss = task_loss + cfg.lm_weight * lm_loss if lm_loss is not None else task_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history["train"].append([step, loss.item(), task_loss.item(), lm_loss.item() if lm_loss is not None else 0.0])
        if step % cfg.eval_every == 0 or step == steps:
            m = held_out_metrics(clf, held, pad_id, special, cfg.batch_size)
            history["held_out"].append({"step": step, **m})
            log.info("classify step %d/%d loss %.4f held-out task loss %.4f acc %.3f", step, steps, loss.item(),
                     m["task_loss"], m["acc"])
            print(f"[classify] step {step}/{steps} loss {loss.item():.4f} held-out task loss {m['task_loss']:.4f} "
                  f"acc {m['acc']:.3f}", flush=True)
    return history
