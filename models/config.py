"""The GPT's config: a pydantic model without torch, so that the CLI, the presets and Prefect's parameter
schemas can read and check it without importing torch. `models.gpt.GPT` builds the network from it."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GPTConfig(BaseModel):
    """Everything needed to build a `GPT`; `None` fields resolve to the architecture's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Literal["gpt2", "llama"] = Field("llama", description="Architecture family: 'gpt2' or 'llama'.")
    vocab_size: int = Field(gt=0, description="Number of token ids (embedding rows).")
    block_size: int = Field(gt=0, description="Maximum context length in tokens.")
    n_layer: int = Field(gt=0, description="Number of transformer blocks.")
    n_head: int = Field(gt=0, description="Number of attention (query) heads.")
    n_embd: int = Field(gt=0, description="Width of the residual stream (d_model).")
    n_kv_head: int | None = Field(
        None, gt=0, description="Key/value heads for grouped-query attention; None means n_head."
    )
    ffn_hidden: int | None = Field(
        None,
        gt=0,
        description="MLP hidden width; None means 4*n_embd (gpt2) or 8/3*n_embd rounded up to 64 (llama).",
    )
    bias: bool | None = Field(
        None, description="Biases in linear layers and LayerNorm; None means True (gpt2) or False (llama)."
    )
    gelu: Literal["tanh", "exact"] = Field(
        "tanh", description="The GPT-2 MLP's GELU: 'tanh' (GPT-2's approximation; Hugging Face `gelu_new`) or 'exact' "
        "(erf; Hugging Face `gelu`, ~1.5x faster forward and backward on CPU). Unused by llama (SwiGLU).")
    mlp: Literal["swiglu", "relu2"] = Field(
        "swiglu", description="The LLaMA MLP: 'swiglu' (LLaMA's) or 'relu2' (two matrices around relu(x)^2, the GPT-2 "
        "speedruns' choice; ffn_hidden defaults to 4*n_embd; not exportable to transformers). Unused by gpt2.")
    qk_norm: bool = Field(False, description="RMSNorm on each head's queries and keys before RoPE and attention "
                          "(OLMo 2, Qwen 3, the speedruns; not exportable to transformers' Llama or GPT-2).")
    logit_softcap: float | None = Field(
        None, gt=0.0, description="Squash the logits to cap * tanh(logits / cap) (Gemma 2, the speedruns); None: off. "
        "Not with loss_chunk; not exportable to transformers' Llama or GPT-2.")
    x0_mix: bool = Field(False, description="Each block reads a * x + b * x0, x0 the embedding's output and a, b "
                         "learned per block from 1 and 0 (the GPT-2 speedruns); not exportable to transformers.")
    tie_embeddings: bool = Field(True, description="Share the token embedding with the output head.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and residuals.")
    attn_dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="Dropout on the attention weights alone; None: `dropout`. 0 keeps the fused "
        "attention kernel (on CPU, 4x128 LLaMA at context 256: 5.2k tokens/s with 0.1 everywhere, 7.2k with 0.1 off "
        "the attention weights, 8.2k with none).")
    rope_theta: float = Field(10000.0, gt=0.0, description="RoPE base frequency (llama only).")
    norm_eps: float = Field(1e-5, gt=0.0, description="Epsilon of LayerNorm / RMSNorm.")
    doc_mask: bool = Field(False, description="Block attention across eot_id boundaries inside a packed window.")
    eot_id: int | None = Field(
        None, ge=0, description="End-of-text token id closing each document (required by doc_mask)."
    )
    flex_attention: bool = Field(
        True,
        description="With doc_mask on GPU (training and scoring, no KV cache, no dropout), attend through "
        "FlexAttention's block-sparse kernel; off, or on CPU (no FlexAttention backward there), SDPA with a mask.",
    )
    loss_chunk: int = Field(
        0,
        ge=0,
        description="With targets, run the output head and the cross-entropy over chunks of this many tokens, "
        "never holding the whole (tokens x vocabulary) logits; forward then returns logits None. 0: off.",
    )

    @model_validator(mode="after")
    def _check(self) -> GPTConfig:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads != 0:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})")
        if self.arch == "gpt2" and self.kv_heads != self.n_head:
            raise ValueError("grouped-query attention (n_kv_head != n_head) needs arch='llama'")
        if self.arch == "llama" and self.head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head dim, got {self.head_dim}")
        if self.doc_mask and self.eot_id is None:
            raise ValueError("doc_mask=True requires eot_id")
        if self.logit_softcap is not None and self.loss_chunk:
            raise ValueError("logit_softcap and loss_chunk cannot be combined (the chunked loss has no cap)")
        if self.eot_id is not None and self.eot_id >= self.vocab_size:
            raise ValueError(f"eot_id ({self.eot_id}) must be < vocab_size ({self.vocab_size})")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attention_dropout(self) -> float:
        return self.attn_dropout if self.attn_dropout is not None else self.dropout

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if not self.swiglu:
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)  # SwiGLU keeps ~8 d^2 weights with 3 matrices

    @property
    def swiglu(self) -> bool:
        """The block's MLP is SwiGLU (three matrices); otherwise GELU (gpt2) or ReLU^2, two matrices."""
        return self.arch == "llama" and self.mlp == "swiglu"

    @property
    def hf_unsupported(self) -> list[str]:
        """The options set here that transformers' GPT2LMHeadModel / LlamaForCausalLM cannot express."""
        off = [f"mlp={self.mlp}"] if self.arch == "llama" and not self.swiglu else []
        off += ["qk_norm=true"] if self.qk_norm else []
        off += ["x0_mix=true"] if self.x0_mix else []
        return off + ([f"logit_softcap={self.logit_softcap}"] if self.logit_softcap is not None else [])

    @property
    def use_bias(self) -> bool:
        return self.bias if self.bias is not None else self.arch == "gpt2"
