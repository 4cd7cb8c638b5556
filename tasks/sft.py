"""SFT stage: supervised fine-tuning of the pretrained GPT on chat data, on Ray Train workers, loss on assistant
tokens only.

In: a pretrained `model/` folder, the tokenizer, a chat file (Alpaca, OpenAssistant or `messages` JSONL).
Out: `model/` (safetensors + config, the base model's own architecture settings), `history.json`,
`loss_curve.png`, the token windows in `windows/` and Ray Train checkpoints under `ray/`. The driver renders the
conversations with the chat template and packs them into windows (`tasks/packing.py`); the workers run the loop
pretraining runs (`tasks/train_worker.py`, here through `tasks/sft_worker.py`): DDP or FSDP, gradient
accumulation, warmup + cosine, clipping, checkpoints with exact resume. Run alone:
`gptflow sft --model DIR --tokenizer DIR`.

Loss: the sum of the token losses over every assistant token of the optimizer step (all micro-batches, all
ranks) divided by their number, so a long answer weighs as many tokens as it has, whatever micro-batch holds it.

torch is imported inside the functions: the CLI, the presets and Prefect's parameter schemas import `SFTConfig`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from models.lora import LoraOptions
from tasks.chat import IGNORE, render
from tasks.conversations import SFTSource, SFTSources, load_mixture
from tasks.plots import plot_loss
from tasks.refs import ModelRef, RunLink, TokenizerRef
from tasks.stage import GptflowError
from tasks.train_config import TrainOptions

if TYPE_CHECKING:
    import torch

    from tasks.pretrain import FitClock


class SFTConfig(TrainOptions):
    sources: SFTSources = Field(
        (SFTSource(path="data/sft/alpaca_en_demo.json.gz"),), min_length=1,
        description="Chat data, mixed by weight: local JSON/JSONL/Parquet files (Alpaca, OpenAssistant trees, ShareGPT, "
        "'messages'), Hub-layout folders or Hub names. A path, or a list of paths, stands for sources of weight 1.")
    max_examples: int = Field(1000, ge=1, description="Use at most this many conversations (drawn by weight, seeded).")
    samples: int = Field(3, ge=0, description="Held-out prompts answered by the fine-tuned model (greedy) into samples.md.")
    lora: LoraOptions | None = Field(
        None, description="Train LoRA adapters (peft) instead of every weight; model/ gets them merged, adapters/ alone.")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Conversations held out to measure validation loss.")
    batch_size: int = Field(4, ge=1, description="Windows (packed) or conversations (padded) per micro-batch per worker.")
    batch_tokens: int | None = Field(
        None, ge=1,
        description="Tokens per optimizer step; grad_accum then follows as batch_tokens / (num_workers * batch_size * "
        "block_size of the base model), which must be a whole number. None: use grad_accum.")
    eval_every: int = Field(50, ge=1, description="Validation loss on every held-out window every N steps (and at the end).")
    packing: bool = Field(
        True, description="Pack several conversations into each window of block_size+1 tokens, each closed by "
        "<|endoftext|>, with the document mask on (no conversation attends to another, positions restart). False: "
        "one conversation per row, padded (batches trimmed to their longest row).")
    too_long: Literal["truncate", "skip"] = Field(
        "truncate", description="A conversation longer than the context (block_size tokens before its eot): truncate "
        "keeps its first block_size tokens (a cut answer still trains; one left without assistant tokens is "
        "skipped), skip leaves it out. Either way it is counted in the stage's counts.")

    @model_validator(mode="after")
    def _check_accum(self) -> SFTConfig:
        if self.batch_tokens is not None and self.grad_accum != 1:
            raise ValueError("set batch_tokens or grad_accum, not both")
        return self

    def accum_steps(self, block_size: int) -> int:
        """Micro-batches per optimizer step on each worker, for the base model's block size."""
        if self.batch_tokens is None:
            return self.grad_accum
        per_micro = self.num_workers * self.batch_size * block_size
        if self.batch_tokens % per_micro:
            raise GptflowError(f"sft.batch_tokens ({self.batch_tokens:,}) must be a multiple of num_workers * "
                               f"batch_size * block_size ({per_micro:,})")
        return self.batch_tokens // per_micro


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (ids, labels) rows into inputs x = ids[:-1] and targets y = labels[1:] (pad targets ignored);
    the preference stage's batches."""
    import torch

    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(labels[1:])
    return x, y


def load_examples(cfg: SFTConfig, tok, block_size: int) -> tuple[list, list, dict]:
    """Draw up to `max_examples` conversations from the sources by weight (seeded; `tasks.conversations`), render
    each whole (longer than the context too: `tasks.packing.fit_rows` applies `too_long`), and split off the
    validation conversations. The counts hold the sources' drops by reason and the realised mixture as `data/*`."""
    convos, data_counts = load_mixture(list(cfg.sources), cfg.max_examples, cfg.seed)
    rows = [render(c, tok, sys.maxsize) for c in convos]
    kept = [r for r in rows if any(label != IGNORE for label in r[1][1:])]
    n_val = max(1, int(len(kept) * cfg.val_fraction))
    counts = {**{f"data/{k}": v for k, v in data_counts.items()}, "conversations": len(convos), "kept": len(kept),
              "dropped_no_assistant_tokens": len(rows) - len(kept), "train": len(kept) - n_val, "val": n_val}
    if len(kept) - n_val < 1:
        names = ", ".join(src.path for src in cfg.sources)
        raise GptflowError(f"{names}: too few usable conversations ({len(kept)})")
    return kept[n_val:], kept[:n_val], counts


def make_windows(cfg: SFTConfig, train: list, val: list, tok, block_size: int, out: Path) -> dict[str, Any]:
    """Fit each conversation to the context, pack (or pad) them into windows saved under `out/{train,val}`;
    returns the counts by reason and the padding shares (the packed layout, and one conversation per window)."""
    from models.tokens import EOT, PAD
    from tasks.packing import fit_rows, pack, pad_rows

    eot, pad = tok.token_to_id(EOT), tok.token_to_id(PAD)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").write_text(json.dumps({"eot_id": eot, "pad_id": pad, "block_size": block_size,
                                               "packing": cfg.packing}))
    counts: dict[str, Any] = {}
    for split, rows in (("train", train), ("val", val)):
        fitted, fit_counts = fit_rows(rows, block_size, eot, cfg.too_long)
        if not fitted:
            raise GptflowError(f"{', '.join(src.path for src in cfg.sources)}: no {split} conversation fits the context of {block_size} tokens")
        windows = pack(fitted, block_size, pad) if cfg.packing else pad_rows(fitted, block_size, pad)
        windows.save(out / split)
        counts |= {f"{split}_{k}": v for k, v in fit_counts.items()}
        counts |= {f"{split}_windows": len(windows.lengths),
                   f"{split}_assistant_tokens": int((windows.labels != IGNORE).sum())}
        if split == "train":
            counts["pad_share"] = windows.pad_share
            counts["pad_share_one_per_window"] = pad_rows(fitted, block_size, pad).pad_share
    return counts


# ---------------------------------------------------------------- the driver


def finetune_sft(cfg: SFTConfig, model: ModelRef, tokenizer: TokenizerRef, out_dir: Path, run: RunLink | None = None,
                 progress_file: IO[str] | None = None) -> ModelRef:
    """Fine-tune `model` on `cfg.sources` rendered with the chat template, on Ray Train workers; save the model and
    its loss curve.

    Args:
        cfg: the stage's config; local source paths are resolved as `infra.env.resolve_path` resolves a user path.
        model: the pretrained model folder.
        tokenizer: the tokenizer folder (its `<|endoftext|>`, `<|pad|>` and chat tokens).
        out_dir: the stage folder: `model/`, `history.json`, `loss_curve.png`, `windows/`, `ray/`.
        run: the MLflow run rank 0 logs its per-step metrics to; None logs nothing.
        progress_file: where the progress bar is drawn (None: stderr, when it is a terminal).

    Returns:
        The fine-tuned model folder, with the data's counts, the losses before and after, tokens/s and the
        padding share.
    """
    from models.checkpoint import load_config
    from tasks.bpe import load_tokenizer
    from tasks.pretrain import fit_and_export
    from tasks.sft_worker import sft_loop_per_worker

    base = Path(model.path)
    block_size = load_config(base).block_size
    cfg.accum_steps(block_size)  # a batch_tokens that does not divide fails here, before Ray starts
    tok = load_tokenizer(Path(tokenizer.path))
    train, val, counts = load_examples(cfg, tok, block_size)
    counts |= make_windows(cfg, train, val, tok, block_size, out_dir / "windows")
    config = {"cfg": cfg.model_dump(mode="json"), "base": str(base.resolve()),
              "windows": str((out_dir / "windows").resolve()), "run": (run or RunLink()).model_dump()}
    history, final, fit = fit_and_export(sft_loop_per_worker, config, cfg, "sft", out_dir, progress_file,
                                             lambda d: _export(d, out_dir, cfg.lora))
    plot_loss(history, out_dir / "loss_curve.png", "SFT (assistant tokens)")
    write_samples(out_dir / "model", val[: cfg.samples], tok, out_dir / "samples.md")
    return _model_ref(cfg, out_dir, history, counts, final, fit)


def write_samples(model_dir: Path, rows: list, tok, out: Path, max_new_tokens: int = 64) -> None:
    """The fine-tuned model's greedy answers to held-out conversations' first user turn, beside the reference
    answer, as Markdown: whether the model answers in the chat format and ends its turn with `<|end|>`."""
    from models.checkpoint import load_model
    from models.generate import generate
    from models.tokens import END

    if not rows:
        return
    model, end = load_model(model_dir), tok.token_to_id(END)
    starts = [next(i for i, label in enumerate(labels) if label != IGNORE) for _, labels in rows]
    prompts = [ids[:i] for (ids, _), i in zip(rows, starts, strict=True)]  # up to and with `<|assistant|>`
    max_new_tokens = min(max_new_tokens, model.config.block_size - max(len(p) for p in prompts))
    if max_new_tokens < 1:  # a prompt fills the context: nothing to answer with
        return
    answers = generate(model, prompts, max_new_tokens, temperature=0.0, stop_ids=[end], seed=0)
    parts = ["# SFT samples: held-out prompts, greedy decoding\n"]
    for n, ((ids, _), i, prompt, answer) in enumerate(zip(rows, starts, prompts, answers, strict=True), 1):
        reference = ids[i:]
        reference = reference[: reference.index(end)] if end in reference else reference
        ended = len(answer) < max_new_tokens  # generation stopped at `<|end|>`, not at the token limit
        parts += [f"## Prompt {n}\n", "```", tok.decode(prompt, skip_special_tokens=False), "```\n",
                  f"**Model** ({'ended its turn with <|end|>' if ended else f'no <|end|> in {max_new_tokens} tokens'}):\n",
                  "```", tok.decode(answer), "```\n", "**Reference:**\n", "```", tok.decode(reference), "```\n"]
    out.write_text("\n".join(parts))


def _export(checkpoint: Path, out_dir: Path, lora: LoraOptions | None) -> dict[str, list]:
    """The model and the history of the last checkpoint into the stage folder; returns the history. With LoRA
    the checkpoint holds the frozen base and the adapters: `adapters/` gets the adapters alone and `model/` the
    weights with the adapters merged, so that every later stage and the export read a plain model."""
    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    if lora is None:
        for name in ("model.safetensors", "config.json"):
            shutil.copy(checkpoint / name, model_dir / name)
    else:
        from models.checkpoint import load_config, load_weights, save_model
        from models.gpt import GPT
        from models.lora import add_lora, merge_lora, save_adapters

        model = add_lora(GPT(load_config(checkpoint)), lora)
        load_weights(model, checkpoint)
        save_adapters(model, out_dir / "adapters")
        save_model(merge_lora(model), model_dir)
    history = json.loads((checkpoint / "train_state.json").read_text())["history"]
    (out_dir / "history.json").write_text(json.dumps(history))
    return history


def _model_ref(cfg: SFTConfig, out_dir: Path, history: dict[str, list], counts: dict[str, Any],
               final: dict[str, Any], fit: FitClock) -> ModelRef:
    metrics = {"sft/val_loss_before": history["val"][0][1], "sft/val_loss_after": history["val"][-1][1],
               "sft/final_train_loss": history["train"][-1][1],
               "sft/tokens_per_s": final.get("perf_tokens_per_s", math.nan), **fit.metrics("sft"),
               "sft/pad_share": counts["pad_share"], "sft/pad_share_one_per_window": counts["pad_share_one_per_window"]}
    files = {"model": out_dir / "model", "loss_curve": out_dir / "loss_curve.png", "history": out_dir / "history.json",
             "samples": out_dir / "samples.md"}
    counts = {k: v for k, v in counts.items() if not k.startswith("pad_share")} | {"steps": cfg.steps}
    return ModelRef(path=str(out_dir / "model"), counts=counts, metrics=metrics,
                    files={k: str(v) for k, v in files.items()}, artifacts=["loss_curve", "history", "samples"])
