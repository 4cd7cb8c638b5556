"""Importing a Hugging Face model (what users download) as our GPT: randomly initialised `transformers` models
(nothing can be downloaded here) give the same logits through our GPT, and import -> export gives back the same
weights. Run: `.venv/bin/python -m pytest tests/unit/test_hf_import.py -q`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from models.checkpoint import load_model
from models.export import export_hf
from models.hf_import import import_hf

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4),
    "gpt2_untied": lambda: transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                                   n_inner=48, tie_word_embeddings=False),
    "gpt2_exact_gelu": lambda: transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                                       activation_function="gelu"),
    "llama_gqa": lambda: transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=80,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=32, rope_theta=500000.0),
    "llama_bias_tied": lambda: transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=2,
                                                        max_position_embeddings=32, attention_bias=True,
                                                        mlp_bias=True, tie_word_embeddings=True),
}


def _hf_model(case: str, folder):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CASES[case]()).eval()
    with torch.no_grad():  # random, non-trivial norms and biases: a mapping that drops one shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("case", CASES)
def test_imported_model_gives_transformers_logits_and_exports_back(case, tmp_path):
    hf = _hf_model(case, tmp_path / "hf")
    ours = load_model(import_hf(tmp_path / "hf", tmp_path / "ours")).eval()
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        expected = hf(x).logits
        got = ours(x)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    vocab = {f"t{i}": i for i in range(97)}  # export needs a tokenizer file; any one of the right size
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.save(str(tmp_path / "tokenizer.json"))
    export_hf(tmp_path / "ours", tmp_path / "tokenizer.json", tmp_path / "back")
    before, after = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    before = {k: v for k, v in before.items() if not k.endswith(".attn.bias")}
    assert set(after) <= set(before)
    for k in after:
        torch.testing.assert_close(after[k], before[k], atol=0, rtol=0, msg=k)


def test_pickles_and_unsupported_configs_are_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_positions": 8,
                                                      "n_embd": 8, "n_layer": 1, "n_head": 2}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"pytorch_model.bin'\] are pickles, which are not loaded"):
        import_hf(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="model_type 'mistral' is not importable"):
        import_hf(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match=r"config.json: hidden_act='gelu' is not supported"):
        import_hf(tmp_path, tmp_path / "out")


def test_the_import_command(tmp_path, capsys):
    from flows.cli import main

    _hf_model("llama_gqa", tmp_path / "hf")
    assert main(["import", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    assert "imported" in capsys.readouterr().out and load_model(tmp_path / "ours").config.n_kv_head == 2
    (tmp_path / "hf" / "model.safetensors").unlink()
    assert main(["import", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "x")]) == 2
    assert "gptflow: error:" in capsys.readouterr().err
