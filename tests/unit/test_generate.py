"""Generation: the KV cache gives the same logits and tokens as full recomputation."""

from __future__ import annotations

import pytest
import torch

from models.generate import KVCache, filter_logits, generate
from models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


ARCHS = {
    "gpt2": dict(arch="gpt2"),
    "llama_gqa": dict(arch="llama", n_kv_head=2),
    "llama_gqa_docmask": dict(arch="llama", n_kv_head=1, doc_mask=True, eot_id=0),
    "llama_speedrun": dict(arch="llama", n_kv_head=2, mlp="relu2", qk_norm=True, logit_softcap=3.0, x0_mix=True),
}
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 0, 8, 9], [42], [3, 0, 3, 0]]


def build(**kw) -> GPT:
    cfg = GPTConfig(**{**dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32), **kw})
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # larger weights: varied, non-repeating outputs
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_logits_match_full_forward(arch):
    model = build(**ARCHS[arch])
    idx = torch.randint(1, 61, (2, 12))
    idx[0, 4] = 0  # an eot inside the window (matters for doc_mask)
    full, _ = model(idx)
    cache = KVCache(model.config, batch_size=2, max_len=12)
    parts = [model(idx[:, :5], kv_cache=cache)[0]]  # prefill 5
    parts += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(5, 9)]  # 4 single steps
    parts.append(model(idx[:, 9:], kv_cache=cache)[0])  # a 3-token chunk on top of the cache
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 12


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_matches_single_rows(arch):
    model = build(**ARCHS[arch])
    prompts = [[1, 2, 3, 4, 5, 6], [7, 0, 9]]
    cache = KVCache(model.config, batch_size=2, max_len=8, pad=[0, 3])
    batch = torch.tensor([prompts[0], [0, 0, 0] + prompts[1]])
    logits, _ = model(batch, kv_cache=cache)
    step, _ = model(torch.tensor([[11], [12]]), kv_cache=cache)
    for row, prompt, nxt in [(0, prompts[0], 11), (1, prompts[1], 12)]:
        ref, _ = model(torch.tensor([prompt + [nxt]]))
        torch.testing.assert_close(logits[row, -len(prompt) :], ref[0, :-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[row, -1], ref[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "opts",
    [dict(temperature=0.0), dict(temperature=1.0, seed=7), dict(temperature=0.8, top_k=10, top_p=0.9, seed=1)],
)
def test_cache_and_no_cache_agree(arch, opts):
    model = build(**ARCHS[arch])
    cached = generate(model, PROMPTS, max_new_tokens=12, use_cache=True, **opts)
    uncached = generate(model, PROMPTS, max_new_tokens=12, use_cache=False, **opts)
    assert cached == uncached
    assert [len(o) for o in cached] == [12] * len(PROMPTS)
    assert len({tuple(o) for o in cached}) > 1


def test_seed_reproducible_and_batch_independent():
    model = build(arch="llama", n_kv_head=2)
    a = generate(model, PROMPTS, 10, seed=3)
    assert a == generate(model, PROMPTS, 10, seed=3)
    assert a != generate(model, PROMPTS, 10, seed=4)
    assert generate(model, PROMPTS[:1], 10, seed=3) == a[:1]  # a row samples the same alone or batched


def test_greedy_is_argmax():
    model = build(arch="gpt2")
    out = generate(model, [[1, 2, 3]], 5, temperature=0)[0]
    seq = [1, 2, 3]
    for tok in out:
        logits, _ = model(torch.tensor([seq]))
        assert tok == logits[0, -1].argmax().item()
        seq.append(tok)


def test_stop_ids():
    model = build(arch="gpt2")
    free = generate(model, PROMPTS, 12, temperature=0)
    stop = free[1][4]
    for use_cache in (True, False):
        out = generate(model, PROMPTS, 12, temperature=0, stop_ids=[stop], use_cache=use_cache)
        for row, full in zip(out, free, strict=True):
            expected = full[: full.index(stop)] if stop in full else full
            assert row == expected
        assert stop not in out[1]


def test_limits_and_edge_cases():
    model = build(arch="gpt2")
    assert generate(model, [[1], [2, 3]], 0) == [[], []]
    assert len(generate(model, [[1] * 30], 3)[0]) == 3  # 30 + 3 - 1 = block_size 32
    with pytest.raises(ValueError, match="block_size"):
        generate(model, [[1] * 30], 4)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 3)
    model.train()
    generate(model, [[1]], 2)
    assert model.training  # mode restored


def test_filter_logits():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    top2 = filter_logits(logits, top_k=2, top_p=None)
    assert torch.isfinite(top2).tolist() == [[True, True, False, False, False]]
    probs = torch.softmax(logits, -1)[0]  # ~[0.64, 0.24, 0.09, 0.03, 0.01]
    nucleus = filter_logits(logits, top_k=None, top_p=0.8)
    assert torch.isfinite(nucleus).tolist() == [[True, True, False, False, False]]
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert torch.isfinite(filter_logits(logits, None, 0.01)).sum() == 1  # the best token always stays
