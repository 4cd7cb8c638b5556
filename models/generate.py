"""Autoregressive sampling from a `GPT`, with a simple preallocated KV cache.

`generate(model, prompts, ...)` returns only the new tokens of each prompt. With `use_cache=True` the prompts
are left-padded into one batch and decoded one token per step through a `KVCache`; with `use_cache=False` each
prompt is decoded alone by re-running the full sequence every step (the slow, obviously-correct reference).
Both give the same tokens: every prompt draws its random numbers from its own generator seeded with
`seed + i`, one uniform number per step, so batching does not change what a row samples. `stream(model, prompt,
...)` yields one prompt's new tokens as they are sampled (a chat window prints them at once); it draws the same
random numbers as row 0 of `generate`, so both give the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.nn import functional as F

from models.gpt import GPT, GPTConfig


class KVCache:
    """Per-layer keys/values for B rows and up to `max_len` positions, filled left to right.

    Left-padded rows say how many pad tokens they start with in `pad` (B,); the model then masks those keys
    and starts each row's positions at 0. `tokens` keeps the ids fed so far (document masking needs them).
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        pad: Sequence[int] | torch.Tensor | None = None,
    ):
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)  # per layer: (B, nkv, L, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.tokens = torch.zeros(batch_size, max_len, device=device, dtype=torch.long)  # (B, L)
        pad = torch.zeros(batch_size, dtype=torch.long) if pad is None else torch.as_tensor(pad)
        self.pad = pad.to(device=device, dtype=torch.long)  # (B,)
        self.padded = bool((self.pad > 0).any())
        self.max_len = max_len
        self.pos = 0  # positions filled so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) at [pos, pos + T) and return everything so far: (B, nkv, pos + T, hd)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, idx: torch.Tensor) -> None:
        """Called by the model once all layers have stored the new tokens idx (B, T)."""
        T = idx.size(1)
        self.tokens[:, self.pos : self.pos + T] = idx
        self.pos += T


# ----------------------------------------------------------------------------------------------------------
# sampling


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass top_p; logits (B, V)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens; the best is always kept
        sorted_logits = sorted_logits.masked_fill(mass_before > top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row from logits (B, V): argmax at temperature 0, else one uniform draw per row."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    cdf = F.softmax(logits, dim=-1).cumsum(dim=-1)  # (B, V)
    u = torch.stack([torch.rand((), generator=g, device=logits.device) for g in generators])  # (B,)
    u = u.unsqueeze(1) * cdf[:, -1:]  # scale by the total so rounding never overshoots
    choice = (cdf < u).sum(dim=-1)  # first index where cdf >= u
    return choice.clamp(max=logits.size(-1) - 1)


# ----------------------------------------------------------------------------------------------------------
# generation


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
    seed: int | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (at most max_new_tokens; a stop id ends a row and is not included)."""
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    generators = [_generator(seed, i, device) for i in range(len(prompts))]
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=set(stop_ids))
    was_training = model.training
    model.eval()
    try:
        if use_cache:
            return _generate_cached(model, prompts, max_new_tokens, generators, device, **opts)
        return [
            _generate_uncached(model, p, max_new_tokens, g, device, **opts)
            for p, g in zip(prompts, generators, strict=True)
        ]
    finally:
        model.train(was_training)


def _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p) -> None:
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0 or temperature < 0:
        raise ValueError("max_new_tokens and temperature must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError("top_k must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens - 1 > model.config.block_size:  # the last sampled token is never fed
        raise ValueError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds block_size {model.config.block_size}"
        )


def _generator(seed: int | None, row: int, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None  # global RNG
    return torch.Generator(device=device).manual_seed(seed + row)


def _generate_uncached(model, prompt, max_new_tokens, generator, device, temperature, top_k, top_p, stop_ids):
    seq = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = model(seq)  # (1, T, V)
        nxt = sample(logits[:, -1], temperature, top_k, top_p, [generator])  # (1,)
        if nxt.item() in stop_ids:
            break
        out.append(nxt.item())
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return out


def _generate_cached(model, prompts, max_new_tokens, generators, device, temperature, top_k, top_p, stop_ids):
    B, P = len(prompts), max(len(p) for p in prompts)
    pad = [P - len(p) for p in prompts]
    idx = torch.tensor(
        [[0] * n + p for n, p in zip(pad, prompts, strict=True)], dtype=torch.long, device=device
    )  # (B, P)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, B, P + max_new_tokens, device=device, dtype=dtype, pad=pad)
    logits, _ = model(idx, kv_cache=cache)  # prefill: (B, P, V)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * B
    for step in range(max_new_tokens):
        nxt = sample(logits[:, -1], temperature, top_k, top_p, generators)  # (B,)
        for b, tok in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if tok in stop_ids:
                done[b] = True
            else:
                out[b].append(tok)
        if all(done) or step == max_new_tokens - 1:
            break
        logits, _ = model(nxt.view(B, 1), kv_cache=cache)  # (B, 1, V)
    return out


@torch.no_grad()
def stream(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
) -> Iterator[int]:
    """One prompt's new tokens, yielded as they are sampled (KV cache); a stop id ends it and is not yielded."""
    _check_args(model, [prompt], max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    generators = [_generator(seed, 0, device)]
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, device=device,
                        dtype=next(model.parameters()).dtype)
        idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, P)
        for step in range(max_new_tokens):
            logits, _ = model(idx, kv_cache=cache)  # prefill (1, P, V), then one step (1, 1, V)
            nxt = sample(logits[:, -1], temperature, top_k, top_p, generators)  # (1,)
            if nxt.item() in stop_ids:
                return
            yield nxt.item()
            if step < max_new_tokens - 1:
                idx = nxt.view(1, 1)
    finally:
        model.train(was_training)
