"""SFT on a tiny real model learns the assistant replies (DPO's run on Ray Train: tests/unit/test_dpo.py)."""

from __future__ import annotations

import json

import pytest
import torch

from models.checkpoint import save_model
from models.gpt import GPT, GPTConfig
from tasks.bpe import save_tokenizer, train_bpe
from tasks.refs import ModelRef, ShardsRef, TokenizerRef
from tasks.sft import SFTConfig, finetune_sft
from tasks.tokenizer import TokenizerConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(tmp_path):
    texts = [f"Question {i}: what is {i} plus {i}? Answer: {2 * i}. Good answer, bad answer." for i in range(60)]
    tok = train_bpe(iter(texts), TokenizerConfig(vocab_size=320, min_frequency=1))
    save_tokenizer(tok, tmp_path / "tok")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_embd=32))
    save_model(model, tmp_path / "base")
    return ModelRef(path=str(tmp_path / "base")), TokenizerRef(path=str(tmp_path / "tok"), shards=ShardsRef(path=""))


@pytest.mark.ray
@pytest.mark.slow
def test_sft_lowers_assistant_loss(ray_once, tmp_path):
    base, tok = _setup(tmp_path)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"add {i} and {i}", "input": "", "output": f"{2 * i}"}) + "\n"
                            for i in range(40)))
    r = finetune_sft(SFTConfig(sources=str(data), steps=60, batch_size=8, lr=3e-3, val_fraction=0.2, num_workers=1), base, tok,
                     tmp_path / "sft")
    assert r.path == str(tmp_path / "sft" / "model") and set(r.artifacts) == {"loss_curve", "history", "samples"}
    assert r.counts["kept"] == 40 and r.counts["train"] + r.counts["val"] == 40
    assert r.metrics["sft/val_loss_after"] < 0.7 * r.metrics["sft/val_loss_before"]
    assert (tmp_path / "sft" / "model" / "model.safetensors").exists()
    assert "ended its turn with <|end|>" in (tmp_path / "sft" / "samples.md").read_text()  # learned to stop
    assert (tmp_path / "sft" / "loss_curve.png").stat().st_size > 1000
