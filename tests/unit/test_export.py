"""Hugging Face export: the exported folder loads with transformers and gives our logits."""

from __future__ import annotations

import pytest
import torch

from models.checkpoint import save_model
from models.export import export_hf
from models.generate import generate
from models.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CASES = {
    "gpt2": (dict(arch="gpt2"), "GPT2LMHeadModel"),
    "gpt2_nobias_untied": (dict(arch="gpt2", bias=False, tie_embeddings=False), "GPT2LMHeadModel"),
    "gpt2_exact_gelu": (dict(arch="gpt2", gelu="exact"), "GPT2LMHeadModel"),
    "llama_gqa": (dict(arch="llama", n_kv_head=2, rope_theta=500000.0), "LlamaForCausalLM"),
    "llama_bias_untied": (dict(arch="llama", bias=True, tie_embeddings=False), "LlamaForCausalLM"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A character-level tokenizer: id 0 is <|endoftext|>, then a..z."""
    vocab = {"<|endoftext|>": 0, **{chr(ord("a") + i): i + 1 for i in range(26)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("case", CASES)
def test_export_matches_hf(tmp_path, tokenizer_json, case):
    kw, hf_class = CASES[case]
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, **kw)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    save_model(model, tmp_path / "ckpt")
    out = export_hf(tmp_path / "ckpt", tokenizer_json, tmp_path / "hf")

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == hf_class
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        theirs = hf.eval()(idx).logits
    ours, _ = model(idx)
    assert (ours - theirs).abs().max().item() < 1e-4

    prompt = [3, 1, 4, 1, 5]
    hf_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert hf_ids[0, len(prompt) :].tolist() == generate(model, [prompt], 8, temperature=0)[0]

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok("cab")["input_ids"] == [3, 1, 2]


def test_export_missing_inputs(tmp_path, tokenizer_json):
    with pytest.raises(ValueError, match="config.json"):
        export_hf(tmp_path / "nothing", tokenizer_json, tmp_path / "hf")
    with pytest.raises(ValueError, match="tokenizer"):
        export_hf(tmp_path, tmp_path / "missing.json", tmp_path / "hf")


@pytest.mark.parametrize("kw, named", [(dict(qk_norm=True), "qk_norm=true"), (dict(mlp="relu2"), "mlp=relu2"),
                                       (dict(arch="gpt2", logit_softcap=15.0), "logit_softcap=15.0"),
                                       (dict(x0_mix=True), "x0_mix=true")])
def test_export_refuses_options_transformers_cannot_express(tmp_path, tokenizer_json, kw, named, capsys):
    from flows.cli import main

    cfg = GPTConfig(**{**dict(vocab_size=8, block_size=16, n_layer=1, n_head=2, n_embd=16), **kw})
    save_model(GPT(cfg), tmp_path / "model")
    with pytest.raises(ValueError, match=f"{named} has no equivalent in transformers"):
        export_hf(tmp_path / "model", tokenizer_json, tmp_path / "hf")
    assert main(["export", "--model", str(tmp_path / "model"), "--tokenizer", str(tokenizer_json.parent),
                 "--out", str(tmp_path / "hf")]) == 2
    assert f"gptflow: error: export: the model's {named} has no equivalent" in capsys.readouterr().err
    assert not (tmp_path / "hf" / "model.safetensors").exists()
