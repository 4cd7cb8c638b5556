"""Export a saved `GPT` folder as a Hugging Face model folder (`AutoModelForCausalLM.from_pretrained`).

arch "llama" -> `LlamaForCausalLM`; arch "gpt2" -> `GPT2LMHeadModel`. The weights map 1:1:
- llama: our fused c_attn splits into q_proj/k_proj/v_proj; RoPE already uses HF's rotate_half layout, so
  no permutation is needed; w_gate/w_up/c_proj become gate_proj/up_proj/down_proj.
- gpt2: HF uses Conv1D (y = x @ W + b), so every linear weight is transposed; HF always has biases, so a
  bias-free model gets zero biases.
`transformers` is imported inside the functions only. HF has no document masking: a `doc_mask` model exports
fine, and matches ours on any window without an eot token inside it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from models.checkpoint import load_model
from models.gpt import GPT, GPTConfig
from models.tokens import CHAT_TEMPLATE, EOT


def export_hf(model_dir: Path, tokenizer_json: Path, out_dir: Path) -> Path:
    """Write config.json, model.safetensors and tokenizer files (with our chat template) into out_dir."""
    from transformers import PreTrainedTokenizerFast

    tokenizer_json = Path(tokenizer_json)
    if not tokenizer_json.is_file():
        raise ValueError(f"missing tokenizer file: {tokenizer_json}")
    model = load_model(model_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=EOT)
    tokenizer.chat_template = CHAT_TEMPLATE  # the one template: `apply_chat_template` and lm-eval format as SFT did
    eos_id = tokenizer.eos_token_id
    if eos_id is not None and eos_id >= model.config.vocab_size:  # the tokenizer lacked it and added it
        eos_id = None
    hf_config(model.config, eos_id, model.wte.weight.dtype).save_pretrained(out_dir)
    save_file(hf_state_dict(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    return out_dir


def hf_config(cfg: GPTConfig, eos_id: int | None, dtype: torch.dtype = torch.float32):
    """The transformers config equivalent to ours."""
    from transformers import GPT2Config, LlamaConfig

    if cfg.hf_unsupported:
        raise ValueError(f"the model's {', '.join(cfg.hf_unsupported)} has no equivalent in transformers' "
                         f"{'GPT2LMHeadModel' if cfg.arch == 'gpt2' else 'LlamaForCausalLM'}: it cannot be exported "
                         "to Hugging Face format (our own loader, `models.checkpoint.load_model`, reads it)")
    if cfg.arch == "gpt2":
        return GPT2Config(
            architectures=["GPT2LMHeadModel"],
            vocab_size=cfg.vocab_size,
            n_positions=cfg.block_size,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.ffn_dim,
            activation_function="gelu_new" if cfg.gelu == "tanh" else "gelu",
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.attention_dropout,
            layer_norm_epsilon=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            dtype=str(dtype).removeprefix("torch."),
        )
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=cfg.use_bias,
        mlp_bias=cfg.use_bias,
        attention_dropout=cfg.attention_dropout,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        dtype=str(dtype).removeprefix("torch."),
    )


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights renamed (and reshaped) for HF; the tied head is left out, as HF re-ties it."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = _gpt2_state_dict(model.config, sd) if model.config.arch == "gpt2" else _llama_state_dict(model.config, sd)
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _llama_state_dict(cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = sd[ours + "ln_1.weight"]
        out[theirs + "post_attention_layernorm.weight"] = sd[ours + "ln_2.weight"]
        for kind in ("weight", "bias") if cfg.use_bias else ("weight",):
            q, k, v = sd[ours + f"attn.c_attn.{kind}"].split([q_dim, kv_dim, kv_dim], dim=0)
            out[theirs + f"self_attn.q_proj.{kind}"] = q
            out[theirs + f"self_attn.k_proj.{kind}"] = k
            out[theirs + f"self_attn.v_proj.{kind}"] = v
            out[theirs + f"self_attn.o_proj.{kind}"] = sd[ours + f"attn.c_proj.{kind}"]
            out[theirs + f"mlp.gate_proj.{kind}"] = sd[ours + f"mlp.w_gate.{kind}"]
            out[theirs + f"mlp.up_proj.{kind}"] = sd[ours + f"mlp.w_up.{kind}"]
            out[theirs + f"mlp.down_proj.{kind}"] = sd[ours + f"mlp.c_proj.{kind}"]
    return out


def _gpt2_state_dict(cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def bias(name: str, n: int) -> torch.Tensor:  # HF GPT-2 always has biases
        return sd.get(name, torch.zeros(n, dtype=sd["wte.weight"].dtype))

    C = cfg.n_embd
    out = {
        "transformer.wte.weight": sd["wte.weight"],
        "transformer.wpe.weight": sd["wpe.weight"],
        "transformer.ln_f.weight": sd["ln_f.weight"],
        "transformer.ln_f.bias": bias("ln_f.bias", C),
    }
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            out[theirs + f"{norm}.weight"] = sd[ours + f"{norm}.weight"]
            out[theirs + f"{norm}.bias"] = bias(ours + f"{norm}.bias", C)
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            w = sd[ours + f"{layer}.weight"]  # nn.Linear: (out, in)
            out[theirs + f"{layer}.weight"] = w.t()  # Conv1D: (in, out)
            out[theirs + f"{layer}.bias"] = bias(ours + f"{layer}.bias", w.size(0))
    return out
