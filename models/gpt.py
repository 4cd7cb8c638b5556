"""A GPT language model in one file, in two flavours chosen by the config alone.

- `arch="gpt2"`: learned position embeddings, LayerNorm, GELU MLP (tanh approximation as HF `gelu_new`, or exact),
  biases, multi-head attention.
- `arch="llama"`: rotary position embeddings (HF `rotate_half` layout), RMSNorm, SwiGLU MLP, no biases,
  grouped-query attention (`n_kv_head` < `n_head`).

Three options from the GPT-2 speedruns, for either flavour, none of which transformers' Llama or GPT-2 can load
(`models.export` refuses them by name): `mlp="relu2"` (llama: Linear -> relu(x)^2 -> Linear instead of SwiGLU),
`qk_norm` (RMSNorm on each head's queries and keys) and `logit_softcap` (logits squashed to cap * tanh(x / cap)).

Attention always goes through `F.scaled_dot_product_attention`: with `is_causal=True` on the plain training
path, with an explicit boolean mask when documents are masked (`doc_mask`), when a batch is left-padded, or
when a KV cache is fed more than one token at a time. Document masking on GPU goes through FlexAttention
instead (`flex_attention`): a block-sparse kernel that skips the tiles a packed window's document boundaries
mask out, where SDPA with a dense mask falls back to a slower kernel that reads the whole (B, T, T) mask.

Shapes: B batch, T time (new tokens), L keys (cached + new), C = n_embd, nh = n_head, nkv = n_kv_head,
hd = head dim, V = vocab size.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn import functional as F

from models.config import GPTConfig
from models.head_loss import IGNORE_INDEX, chunked_head_loss
from models.optim import MuonAdamW

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from models.generate import KVCache


# ----------------------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 like HF LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32 and not x.is_cuda and not torch.is_autocast_enabled("cpu"):
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # the same values, one kernel: ~25% faster
        return self.composite(x)

    def composite(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Dropout(nn.Module):
    """`nn.Dropout`, with the mask drawn from random bytes on CPU (`byte_dropout`); on GPU, `F.dropout`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return F.dropout(x, self.p, training=True) if x.is_cuda else byte_dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def byte_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout whose mask compares random bytes with round(256 p): torch's CPU `bernoulli_` draws a float per
    element, ~9x slower (a (8, 256, 128) mask: 2.3 ms against 0.26 ms on 2 cores), which was 13% of a
    shakespeare-recipe training step. p is rounded to a multiple of 1/256 (0.2 -> 51/256 = 0.199) and kept
    values are scaled by 1 / (1 - that p), so the expectation stays x."""
    drop = min(round(p * 256), 255)
    if drop == 0:
        return x
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=x.device)
    keep = words.view(torch.uint8)[:n].view(x.shape) >= drop
    return x.mul(keep).mul_(256 / (256 - drop))


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.arch == "gpt2":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.use_bias)
    return RMSNorm(cfg.n_embd, cfg.norm_eps)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, hd): each frequency appears twice, [f0..f_{hd/2-1}, f0..f_{hd/2-1}]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (hd/2,)
    t = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (length, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (length, hd)
    return emb.cos(), emb.sin()


def doc_block_mask(idx: torch.Tensor, eot_id: int) -> BlockMask:
    """FlexAttention mask for packed windows: causal, and only keys of the query's own document (an eot token
    closes the document before it), the same rule as `GPT._attention_mask` with doc_mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = idx.shape
    is_eot = (idx == eot_id).int()
    doc = torch.cumsum(is_eot, dim=1) - is_eot  # (B, T) document index of each position

    def same_document_causal(b, h, q, k):  # noqa: ANN001, ANN202 (index tensors traced by FlexAttention)
        return (q >= k) & (doc[b, q] == doc[b, k])

    return create_block_mask(same_document_causal, B, None, T, T, device=idx.device, _compile=idx.is_cuda)


_compiled_flex = None
_eager_block_mask = None


def _eager_doc_block_mask():  # noqa: ANN202
    """`doc_block_mask` run eagerly (it compiles its own kernels), outside a compiled model's graph. Wrapped on
    first use: `torch.compiler.disable` imports torch._dynamo, ~2 s that every CLI start would pay otherwise."""
    global _eager_block_mask
    if _eager_block_mask is None:
        _eager_block_mask = torch.compiler.disable(doc_block_mask)
    return _eager_block_mask


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, gqa: bool) -> torch.Tensor:
    """FlexAttention, compiled once (uncompiled it runs a slow reference path); inlined into a compiled model."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if not q.is_cuda:  # forward only on CPU (tests compare it with the SDPA mask)
        return flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # first and second half of the head dim
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hd); cos/sin: (B or 1, 1, T, hd)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal attention with a fused q/k/v projection."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.use_rope = cfg.arch == "llama"
        self.dropout = cfg.attention_dropout
        qkv_dim = (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, qkv_dim, bias=cfg.use_bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.use_bias)
        self.resid_dropout = Dropout(cfg.dropout)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps), RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | BlockMask | None,
        kv_cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([q_dim, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = 0
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(layer, k, v)  # (B, nkv, L, hd) with L = past + T
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
            y = flex_attention(q, k, v, mask, gqa=self.n_kv_head != self.n_head)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))
        cpu_amp = not q.is_cuda and torch.is_autocast_enabled("cpu")
        if cpu_amp:  # fp32 under CPU autocast: torch's CPU flash-attention backward is slower in bf16 than in fp32
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if cpu_amp else nullcontext():
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None and past == 0,  # mask None and past > 0 means T == 1: see everything
                enable_gqa=self.n_kv_head != self.n_head,
            )  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2 MLP: Linear -> GELU (tanh approximation, or exact by `cfg.gelu`) -> Linear."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.approximate = "tanh" if cfg.gelu == "tanh" else "none"
        self.c_fc = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.use_bias)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=cfg.use_bias)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class SwiGLU(nn.Module):
    """LLaMA MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.use_bias)
        self.w_up = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.use_bias)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=cfg.use_bias)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.silu(self.w_gate(x)) * self.w_up(x)))


class ReLU2(nn.Module):
    """The GPT-2 speedruns' MLP: Linear -> relu(x)^2 -> Linear."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.use_bias)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=cfg.use_bias)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.relu(self.c_fc(x)).square()))


class Head(nn.Linear):
    """The output head: a Linear without bias, its logits squashed to cap * tanh(logits / cap) when `softcap`."""

    def __init__(self, n_embd: int, vocab_size: int, softcap: float | None):
        super().__init__(n_embd, vocab_size, bias=False)
        self.softcap = softcap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg) if cfg.arch == "gpt2" else ReLU2(cfg) if cfg.mlp == "relu2" else SwiGLU(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | BlockMask | None,
        kv_cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    """Token embedding -> n_layer pre-norm blocks -> final norm -> output head (tied to the embedding by default).

    Parameter names: wte, wpe (gpt2 only), blocks.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.*}, ln_f, lm_head.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.arch == "gpt2" else None
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = make_norm(cfg)
        self.lm_head = Head(cfg.n_embd, cfg.vocab_size, cfg.logit_softcap)
        if cfg.x0_mix:  # block i reads x0_a[i] * x + x0_b[i] * x0: the identity at init
            self.x0_a, self.x0_b = nn.Parameter(torch.ones(cfg.n_layer)), nn.Parameter(torch.zeros(cfg.n_layer))
        if cfg.arch == "llama":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hd)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # residual projections: keep the stream's variance in check
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.doc_mask and cfg.flex_attention:
            _eager_doc_block_mask()  # wrapped now, eagerly, so that torch.compile's tracing finds it ready

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # -- forward ----------------------------------------------------------------------------------------

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and the mean loss over targets != -100 (or None).

        With `kv_cache`, idx holds only the new tokens; their positions start at `kv_cache.pos`. With targets and
        `config.loss_chunk`, the head and the loss run chunk by chunk (`models.head_loss`) and logits is None.
        """
        B, T = idx.shape
        past = 0 if kv_cache is None else kv_cache.pos
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
        pos = self._positions(idx, kv_cache)  # (1 or B, T)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)  # (1 or B, T, C) broadcasts over B
        else:
            rope = (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1))  # (1 or B, 1, T, hd)
        x = self.drop(x)
        mask = self._attention_mask(idx, kv_cache)
        x = self._blocks(x, rope, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(idx)
        x = self.ln_f(x)
        if targets is not None and self.config.loss_chunk and kv_cache is None:
            return None, chunked_head_loss(x, self.lm_head.weight, targets, self.config.loss_chunk)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None if targets is None else self.loss(logits, targets)
        return logits, loss

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> the final norm's output (B, T, C), without the output head: what a task head reads
        (`models.classifier`), at no (B, T, V) cost. The body of `forward` without a KV cache; a test checks
        that `lm_head(hidden_states(idx))` equals `forward(idx)`'s logits."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        pos = self._positions(idx, None)  # (1, T)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1))  # (1, 1, T, hd)
        x = self.drop(x)
        mask = self._attention_mask(idx, None)
        return self.ln_f(self._blocks(x, rope, mask, None))

    def _blocks(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | BlockMask | None, kv_cache: KVCache | None) -> torch.Tensor:
        """The blocks in turn; with `x0_mix`, each reads its learned mix of the stream and the embedding `x`."""
        x0 = x
        for layer, block in enumerate(self.blocks):
            if self.config.x0_mix:
                x = self.x0_a[layer] * x + self.x0_b[layer] * x0
            x = block(x, rope, mask, kv_cache, layer)
        return x

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over targets != -100 (0, not NaN, when every target is ignored)."""
        V = logits.size(-1)
        total = F.cross_entropy(
            logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        return total / count

    def _positions(self, idx: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """Position ids (1, T), or (B, T) when a cached batch is left-padded (each row starts at 0) or documents
        are masked: with doc_mask each document's positions start again at 0 (the token after an eot opens a
        new one), so a conversation packed into a window gets the logits it gets alone; with a KV cache too,
        from the cached tokens, so cached generation equals the full forward."""
        past = 0 if kv_cache is None else kv_cache.pos
        pos = torch.arange(past, past + idx.size(1), device=idx.device).unsqueeze(0)  # (1, T)
        if kv_cache is not None and kv_cache.padded:
            pos = (pos - kv_cache.pad.unsqueeze(1)).clamp(min=0)  # (B, T)
        if self.config.doc_mask:
            tokens = idx if kv_cache is None else torch.cat([kv_cache.tokens[:, :past], idx], dim=1)  # (B, L)
            full = torch.arange(tokens.size(1), device=idx.device).expand_as(tokens)  # (B, L)
            after_eot = torch.zeros_like(tokens, dtype=torch.bool)
            after_eot[:, 1:] = tokens[:, :-1] == self.config.eot_id
            starts = torch.where(after_eot, full, torch.zeros_like(full)).cummax(dim=1).values  # (B, L)
            pos = torch.minimum(pos, (full - starts)[:, past:])  # (B, T): the later of pad end and doc start
        return pos

    def _attention_mask(self, idx: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor | BlockMask | None:
        """Boolean (B, 1, T, L) mask (True = may attend), a FlexAttention BlockMask (doc_mask on GPU, see
        `GPTConfig.flex_attention`), or None when plain causal attention does.

        Rules: causal; never a left-pad key; with doc_mask, only keys of the same document, where an
        eot token closes (belongs to) the document before it. Each query may always see itself, so no
        row is fully masked (which would turn pad positions into NaN).
        """
        cfg = self.config
        B, T = idx.shape
        past = 0 if kv_cache is None else kv_cache.pos
        padded = kv_cache is not None and kv_cache.padded
        if not (cfg.doc_mask or padded or (past > 0 and T > 1)):
            return None
        if cfg.doc_mask and cfg.flex_attention and kv_cache is None and idx.is_cuda:
            if not (self.training and cfg.attention_dropout > 0):  # FlexAttention has no attention dropout
                return self._doc_block_mask(idx)
        L = past + T
        q_pos = torch.arange(past, L, device=idx.device)  # (T,)
        k_pos = torch.arange(L, device=idx.device)  # (L,)
        mask = (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)).expand(B, T, L)  # causal: (B, T, L)
        if padded:
            mask = mask & (k_pos.view(1, 1, L) >= kv_cache.pad.view(B, 1, 1))
        if cfg.doc_mask:
            tokens = idx if kv_cache is None else torch.cat([kv_cache.tokens[:, :past], idx], dim=1)  # (B, L)
            is_eot = (tokens == cfg.eot_id).long()
            doc = torch.cumsum(is_eot, dim=1) - is_eot  # (B, L) document index; eot ends its document
            mask = mask & (doc[:, past:].unsqueeze(2) == doc.unsqueeze(1))  # (B, T, 1) vs (B, 1, L)
        mask = mask | (k_pos.view(1, 1, L) == q_pos.view(1, T, 1))
        return mask.unsqueeze(1)  # (B, 1, T, L) broadcasts over heads

    def _doc_block_mask(self, idx: torch.Tensor) -> BlockMask:
        return _eager_doc_block_mask()(idx, self.config.eot_id)

    # -- bookkeeping --------------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters. non_embedding=True drops the lookup-only tables (positions, and the token
        embedding when untied); a tied embedding stays, because it does a matmul as the output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6N + 12 * n_layer * n_embd * T, T = block_size by
        default. N = num_params(non_embedding=True): every weight that takes part in a matmul."""
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T

    def configure_optimizer(
        self, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95), optimizer: str = "adamw",
        embed_lr_mult: float = 1.0, muon_dtype: torch.dtype | None = None,
    ) -> torch.optim.AdamW | MuonAdamW:
        """AdamW with weight decay on matrices and embeddings (>= 2-D) only, not on norms and biases. With
        `optimizer="muon"`, the blocks' weight matrices go to Muon instead (`models/optim.py`). With
        `embed_lr_mult` != 1 the embeddings (wte, wpe; the head too when tied to wte) are a group of their own whose
        "lr_mult" the training loop multiplies the scheduled learning rate by. `muon_dtype`: Muon's Newton-Schulz
        dtype (default: bf16 on GPU, fp32 elsewhere)."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        embeds = [p for n, p in named if n in ("wte.weight", "wpe.weight")] if embed_lr_mult != 1.0 else []
        matrices = [p for n, p in named if p.dim() == 2 and n.startswith("blocks.")] if optimizer == "muon" else []
        own = {id(p) for p in embeds + matrices}
        rest = [p for _, p in named if id(p) not in own]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        if embeds:
            groups.append({"params": embeds, "weight_decay": weight_decay, "lr": lr * embed_lr_mult,
                           "lr_mult": embed_lr_mult})
        if optimizer == "muon":
            return MuonAdamW(matrices, groups, lr, weight_decay, betas, ns_dtype=muon_dtype)
        params = [p for _, p in named]
        fused = bool(params) and all(p.is_cuda for p in params)
        # fused kernel on GPU; elsewhere foreach (the per-tensor loop is ~10x slower on CPU)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, foreach=not fused)
