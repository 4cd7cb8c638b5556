"""Compute planner: exact parameter counts, FLOPs, memory conventions."""

from __future__ import annotations

import pytest

from models.gpt import GPT, GPTConfig
from models.plan import activation_bytes, flops_per_token, matrix_weights, param_count, plan, training_memory_bytes

GPT3 = GPTConfig(arch="gpt2", vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288)
LLAMA_7B = GPTConfig(
    arch="llama",
    vocab_size=32000,
    block_size=2048,
    n_layer=32,
    n_head=32,
    n_embd=4096,
    ffn_hidden=11008,
    tie_embeddings=False,
)


def test_gpt3_matrix_weights():
    w = matrix_weights(GPT3)
    assert w["embedding"] == 617_558_016
    for name in ("attn_q", "attn_k", "attn_v", "attn_o"):
        assert w[name] == 14_495_514_624
    assert w["mlp"] == 8 * 96 * 12288**2
    assert w["total"] == 175_181_291_520  # embedding and unembedding matrices + 12 * n_layer * d^2


def test_llama_7b_param_count():
    assert param_count(LLAMA_7B) == 6_738_415_616  # the published LLaMA-7B size


def test_full_finetune_memory_7b():
    mem = training_memory_bytes(7e9, weight_bytes=2, grad_bytes=2, optimizer_bytes=8)  # fp32 m and v
    assert mem["total"] == pytest.approx(84e9)
    assert training_memory_bytes(7e9)["total"] == pytest.approx(112e9)  # default: + fp32 master weights


@pytest.mark.parametrize(
    "kw",
    [
        dict(arch="gpt2"),
        dict(arch="gpt2", bias=False, tie_embeddings=False),
        dict(arch="llama", n_kv_head=2),
        dict(arch="llama", bias=True, tie_embeddings=False, ffn_hidden=50),
        dict(arch="llama", n_kv_head=2, mlp="relu2", qk_norm=True, logit_softcap=15.0, x0_mix=True),
        dict(arch="gpt2", qk_norm=True),
    ],
)
def test_counts_match_the_model(kw):
    cfg = GPTConfig(vocab_size=61, block_size=16, n_layer=3, n_head=4, n_embd=32, **kw)
    model = GPT(cfg)
    assert param_count(cfg) == model.num_params()
    assert param_count(cfg, non_embedding=True) == model.num_params(non_embedding=True)
    assert flops_per_token(cfg) == model.flops_per_token()


def test_plan_figures():
    p = plan(GPT3, gpu_flops=1e15, mfu=0.5)
    n = p["params"]
    assert p["chinchilla_tokens"] == p["tokens"] == 20 * n
    assert p["flops_per_token"] == 6 * p["params_non_embedding"] + 12 * 96 * 12288 * 2048
    assert p["train_flops"] == p["flops_per_token"] * p["tokens"]
    assert p["time_seconds"] == pytest.approx(p["train_flops"] / 0.5e15)
    mem = p["memory_per_device_bytes"]
    assert p["bytes_per_param"] == 16
    assert mem["weights"] + mem["grads"] + mem["optimizer"] == 16 * n
    assert mem["total"] == pytest.approx(16 * n + mem["activations"])
    assert p["matrix_weights"] == 175_181_291_520

    p7 = plan(LLAMA_7B, tokens=10**9, optimizer_bytes=8, n_devices=8, sharded=True)
    assert p7["tokens"] == 10**9
    assert p7["memory_per_device_bytes"]["optimizer"] == pytest.approx(8 * 6_738_415_616 / 8)
    assert p7["gpu_hours"] == pytest.approx(p7["time_hours"] * 8)
    with pytest.raises(ValueError):
        plan(GPT3, mfu=0)


def test_activations_with_chunked_loss():
    cfg = GPTConfig(arch="gpt2", vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    layers = 34 * 1024 * 64 * 768 * 12
    assert activation_bytes(cfg, 64) == layers + 8 * 1024 * 64 * 50304  # the whole logits, twice in fp32
    chunked = cfg.model_copy(update={"loss_chunk": 8192})
    held = 8 * 8192 * 50304 + 4 * 1024 * 64 * 768 + 4 * 50304 * 768  # one chunk, grad of h, fp32 grad of the head
    assert activation_bytes(chunked, 64) == layers + held
    assert activation_bytes(chunked, 64) < 0.6 * activation_bytes(cfg, 64)
