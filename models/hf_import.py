"""Import a Hugging Face `GPT2LMHeadModel` or `LlamaForCausalLM` folder as our `GPT`: the inverse of `export.py`.

What users download (a `config.json` and safetensors weights, one file or shards with an index) becomes a model
folder of ours (`model.safetensors` + our `config.json`), the base of SFT and the later stages. Only safetensors
are read: a `pytorch_model.bin` is a pickle, and pickles from the internet are not loaded here. `transformers` is
not needed: the config is JSON, the weights are renamed and reshaped exactly as `export.py` does the other way.
Anything the mapping does not cover (rope scaling, another activation, unexpected weights) is an error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from models.checkpoint import save_state_dict
from models.config import GPTConfig

# the tanh approximation (our default GPT-2 MLP) under both its names, and the exact erf GELU (`gelu="exact"`)
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu")


def import_hf(hf_dir: Path, out_dir: Path) -> Path:
    """Write our model folder for the Hugging Face model in `hf_dir`; returns `out_dir`."""
    hf_dir = Path(hf_dir)
    hf = json.loads((hf_dir / "config.json").read_text())
    cfg = gpt_config(hf, where=str(hf_dir / "config.json"))
    theirs = read_weights(hf_dir)
    ours = _from_gpt2(cfg, theirs) if cfg.arch == "gpt2" else _from_llama(cfg, theirs)
    if not cfg.tie_embeddings:
        ours["lm_head.weight"] = theirs.pop("lm_head.weight")
    theirs.pop("lm_head.weight", None)  # tied: a copy of the embedding some checkpoints store anyway
    if theirs:
        raise ValueError(f"{hf_dir}: weights the import does not map: {sorted(theirs)[:8]}")
    return save_state_dict(ours, cfg, out_dir)


def read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of `model.safetensors`, or of the shards `model.safetensors.index.json` names."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return dict(load_file(str(single)))
    if index.is_file():
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_file(str(hf_dir / shard)))
        return sd
    pickled = [p.name for p in hf_dir.glob("*.bin")]
    raise ValueError(f"{hf_dir}: no model.safetensors (or index)" +
                     (f"; {pickled} are pickles, which are not loaded: convert them to safetensors" if pickled else ""))


def gpt_config(hf: dict[str, Any], where: str) -> GPTConfig:
    """Our config for a transformers config (as a dict), or a ValueError naming the field it cannot map."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        _expect(hf, "activation_function", GPT2_ACTIVATIONS, where)
        return GPTConfig(arch="gpt2", vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                         n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                         gelu="exact" if hf.get("activation_function") == "gelu" else "tanh",
                         ffn_hidden=hf.get("n_inner") or 4 * hf["n_embd"], bias=True,
                         tie_embeddings=hf.get("tie_word_embeddings", True),
                         norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    if kind == "llama":
        _expect(hf, "hidden_act", ("silu",), where)
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            raise ValueError(f"{where}: attention_bias and mlp_bias differ; our GPT has one `bias` for both")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{where}: rope_type {rope['rope_type']!r} is not supported (plain RoPE only)")
        n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim", n_embd // n_head) != n_embd // n_head:
            raise ValueError(f"{where}: head_dim {hf['head_dim']} is not hidden_size / num_attention_heads")
        return GPTConfig(arch="llama", vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                         n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
                         n_kv_head=hf.get("num_key_value_heads") or n_head, ffn_hidden=hf["intermediate_size"],
                         bias=hf.get("attention_bias", False), tie_embeddings=hf.get("tie_word_embeddings", False),
                         rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                         norm_eps=hf.get("rms_norm_eps", 1e-6))
    raise ValueError(f"{where}: model_type {kind!r} is not importable; gpt2 and llama are")


def _expect(hf: dict[str, Any], field: str, allowed: tuple[str, ...], where: str) -> None:
    if hf.get(field, allowed[0]) not in allowed:
        raise ValueError(f"{where}: {field}={hf[field]!r} is not supported; expected one of {allowed}")


def _from_llama(cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`export._llama_state_dict` backwards: q/k/v_proj fuse into c_attn; the rest are renames."""
    out = {"wte.weight": sd.pop("model.embed_tokens.weight"), "ln_f.weight": sd.pop("model.norm.weight")}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[ours + "ln_1.weight"] = sd.pop(theirs + "input_layernorm.weight")
        out[ours + "ln_2.weight"] = sd.pop(theirs + "post_attention_layernorm.weight")
        for kind in ("weight", "bias") if cfg.use_bias else ("weight",):
            qkv = [sd.pop(theirs + f"self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[ours + f"attn.c_attn.{kind}"] = torch.cat(qkv, dim=0)  # (q_dim + 2 kv_dim, C)
            out[ours + f"attn.c_proj.{kind}"] = sd.pop(theirs + f"self_attn.o_proj.{kind}")
            out[ours + f"mlp.w_gate.{kind}"] = sd.pop(theirs + f"mlp.gate_proj.{kind}")
            out[ours + f"mlp.w_up.{kind}"] = sd.pop(theirs + f"mlp.up_proj.{kind}")
            out[ours + f"mlp.c_proj.{kind}"] = sd.pop(theirs + f"mlp.down_proj.{kind}")
    return out


def _from_gpt2(cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`export._gpt2_state_dict` backwards: Conv1D weights (in, out) transpose into nn.Linear (out, in)."""
    for key in [k for k in sd if k.endswith((".attn.bias", ".attn.masked_bias"))]:
        del sd[key]  # causal-mask buffers of older checkpoints, not weights
    out = {name: sd.pop(f"transformer.{name}") for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            for kind in ("weight", "bias"):
                out[ours + f"{norm}.{kind}"] = sd.pop(theirs + f"{norm}.{kind}")
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out[ours + f"{layer}.weight"] = sd.pop(theirs + f"{layer}.weight").t().contiguous()
            out[ours + f"{layer}.bias"] = sd.pop(theirs + f"{layer}.bias")
    return out
