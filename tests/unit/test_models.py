"""GPT model: config validation, causal and document masking, loss, parameter bookkeeping, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from models.checkpoint import load_model, save_model
from models.gpt import GPT, Dropout, GPTConfig, RMSNorm, byte_dropout

pytestmark = pytest.mark.usefixtures("one_thread")


ARCHS = {
    "gpt2": dict(arch="gpt2"),
    "llama": dict(arch="llama"),
    "llama_gqa": dict(arch="llama", n_kv_head=2),
    "llama_speedrun": dict(arch="llama", mlp="relu2", qk_norm=True, logit_softcap=3.0, x0_mix=True),
}


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **kw})


def build(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A model with weights noisy enough that every position matters."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# -- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(n_head=4, n_kv_head=3), "divisible by n_kv_head"),
        (dict(doc_mask=True), "requires eot_id"),
        (dict(eot_id=61), "eot_id"),
        (dict(arch="gpt2", n_kv_head=2), "grouped-query"),
        (dict(n_embd=36, n_head=12), "even head dim"),
        (dict(arch="bert"), "arch"),
        (dict(unknown_field=1), "unknown_field"),
        (dict(n_layer=0), "n_layer"),
        (dict(logit_softcap=10.0, loss_chunk=16), "cannot be combined"),
        (dict(mlp="gelu"), "mlp"),
    ],
)
def test_config_rejects(kw, msg):
    with pytest.raises(ValidationError, match=msg):
        tiny(**kw)


def test_config_defaults_and_frozen():
    llama = GPTConfig(vocab_size=32000, block_size=2048, n_layer=32, n_head=32, n_embd=4096)
    assert llama.arch == "llama" and llama.kv_heads == 32 and llama.use_bias is False
    assert llama.ffn_dim == 10944  # 8/3 * 4096 = 10922.7, rounded up to a multiple of 64
    gpt2 = tiny(arch="gpt2")
    assert gpt2.ffn_dim == 4 * 32 and gpt2.use_bias is True
    assert tiny(doc_mask=True, eot_id=0).doc_mask
    with pytest.raises(ValidationError):
        gpt2.n_layer = 3
    assert all(f.description for f in GPTConfig.model_fields.values())
    assert GPTConfig.model_validate_json(gpt2.model_dump_json()) == gpt2


# -- forward -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_loss(arch):
    model = build(tiny(**ARCHS[arch]))
    idx = torch.randint(0, 61, (2, 12))
    logits, loss = model(idx)
    assert logits.shape == (2, 12, 61) and loss is None
    targets = torch.randint(0, 61, (2, 12))
    _, loss = model(idx, targets)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 61), targets.view(-1))
    torch.testing.assert_close(loss, ref)


def test_loss_ignores_minus_100():
    model = build(tiny())
    idx = torch.randint(0, 61, (2, 10))
    targets = torch.randint(0, 61, (2, 10))
    targets[:, :6] = -100
    logits, loss = model(idx, targets)
    ref = torch.nn.functional.cross_entropy(logits[:, 6:].reshape(-1, 61), targets[:, 6:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    _, loss = model(idx, torch.full_like(targets, -100))  # nothing to learn: 0, not NaN
    assert loss.item() == 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_causal(arch):
    model = build(tiny(**ARCHS[arch]))
    idx = torch.randint(0, 61, (1, 16))
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, 61, (1, 7))
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("arch", ARCHS)
def test_doc_mask(arch):
    eot = 0
    cfg = tiny(**ARCHS[arch], doc_mask=True, eot_id=eot)
    model = build(cfg)
    idx = torch.randint(1, 61, (2, 16))
    idx[:, 6] = eot  # document 1: positions 0..6 (the eot closes it); document 2: 7..15
    changed = idx.clone()
    changed[:, :6] = torch.randint(1, 61, (2, 6))
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, 7:], b[:, 7:])  # the second document cannot see the first
    assert not torch.allclose(a[:, :7], b[:, :7])

    plain = GPT(tiny(**ARCHS[arch]))
    plain.load_state_dict(model.state_dict())
    c, _ = plain.eval()(idx)
    d, _ = plain(changed)
    assert not torch.allclose(c[:, 7:], d[:, 7:])  # without doc_mask, it can
    torch.testing.assert_close(a[:, :7], c[:, :7])  # and the first document is unaffected by the mask


def test_doc_mask_without_eot_equals_causal():
    cfg = tiny(doc_mask=True, eot_id=0)
    model = build(cfg)
    plain = GPT(tiny())
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(1, 61, (2, 16))
    torch.testing.assert_close(model(idx)[0], plain.eval()(idx)[0])


def test_too_long_raises():
    model = build(tiny())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_backward_and_dropout():
    model = GPT(tiny(arch="gpt2", dropout=0.1)).train()
    idx = torch.randint(0, 61, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cpu_bf16_autocast_keeps_attention_in_fp32_and_the_fp32_loss_and_gradients(arch, monkeypatch):
    # pretrain.cpu_bf16: matmuls in bf16, attention in fp32 (its CPU backward is slower in bf16)
    model = build(tiny(**ARCHS[arch]))
    idx = torch.randint(0, 61, (4, 32), generator=torch.Generator().manual_seed(0))
    _, ref = model(idx, idx)
    ref.backward()
    ref_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    loss.backward()
    assert logits.dtype == torch.bfloat16  # the head's matmul ran in bf16
    assert seen == [(torch.float32,) * 3 + (False,)] * model.config.n_layer
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0) > 0.99


def test_rms_norm_in_one_kernel_equals_the_composite():
    """RMSNorm on CPU in fp32 goes through `F.rms_norm`; bf16 through the composite (fp32 inside, as HF)."""
    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 16, 48) * 3
    composite = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(norm(x), composite, atol=1e-6, rtol=1e-6)
    half = x.bfloat16()
    assert norm(half).dtype == torch.float32  # weight (fp32) * normed.to(bf16), as LlamaRMSNorm
    torch.testing.assert_close(norm(half), norm.weight * (half.float() * torch.rsqrt(
        half.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(arch):
    """With qk_norm, scaling the q and k projections changes nothing; without, it changes the logits."""
    idx = torch.randint(0, 61, (2, 12))
    for qk_norm in (True, False):
        model = build(tiny(arch=arch, qk_norm=qk_norm))
        before = model(idx)[0]
        with torch.no_grad():
            for block in model.blocks:
                block.attn.c_attn.weight[: 2 * 32].mul_(3.0)  # the query and key rows (n_kv_head = n_head)
                if block.attn.c_attn.bias is not None:
                    block.attn.c_attn.bias[: 2 * 32].mul_(3.0)
        change = (model(idx)[0] - before).abs().max().item()
        assert change < 1e-3 if qk_norm else change > 0.1  # the norm's eps and float rounding: ~1e-4
    assert "blocks.0.attn.q_norm.weight" in dict(build(tiny(qk_norm=True)).named_parameters())


def test_logit_softcap_squashes_the_head_logits():
    idx = torch.randint(0, 61, (2, 12))
    plain = build(tiny())
    capped = build(tiny(logit_softcap=1.0))
    logits = plain(idx)[0]
    assert logits.abs().max() > 1.0  # the cap below binds
    torch.testing.assert_close(capped(idx)[0], torch.tanh(logits))
    _, loss = capped(idx, idx)
    torch.testing.assert_close(loss, GPT.loss(torch.tanh(logits), idx))


def test_relu2_mlp_is_two_matrices_around_a_squared_relu():
    model = build(tiny(mlp="relu2"))
    mlp = model.blocks[0].mlp
    assert mlp.c_fc.weight.shape == (4 * 32, 32) and not hasattr(mlp, "w_gate")
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mlp(x), mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2))
    assert tiny(mlp="relu2", ffn_hidden=48).ffn_dim == 48 and tiny(arch="gpt2", mlp="relu2").ffn_dim == 128


def test_x0_mix_starts_as_the_plain_stream_and_learns_to_mix_in_the_embedding():
    """At init each block reads 1 * x + 0 * x0: the logits of the model without the mix, same weights. The mix
    weights get gradients, and a block given b = 1 reads the previous block's output plus the embedding's."""
    fresh = GPT(tiny(x0_mix=True, n_layer=3))
    assert fresh.x0_a.tolist() == [1.0] * 3 and fresh.x0_b.tolist() == [0.0] * 3
    idx = torch.randint(0, 61, (2, 12))
    mixed = build(tiny(x0_mix=True))
    with torch.no_grad():  # build() made every weight noisy; the mix back to its init
        mixed.x0_a.fill_(1.0)
        mixed.x0_b.zero_()
    plain = build(tiny())
    plain.load_state_dict({k: v for k, v in mixed.state_dict().items() if not k.startswith("x0_")})
    torch.testing.assert_close(mixed(idx)[0], plain(idx)[0])
    mixed(idx, idx)[1].backward()
    assert mixed.x0_a.grad.abs().min() > 0 and mixed.x0_b.grad.abs().min() > 0
    with torch.no_grad():
        mixed.x0_b[1] = 1.0
    seen: dict[str, torch.Tensor] = {}
    mixed.blocks[0].register_forward_pre_hook(lambda _, args: seen.update(x0=args[0]))
    mixed.blocks[0].register_forward_hook(lambda _, args, out: seen.update(out0=out))
    mixed.blocks[1].register_forward_pre_hook(lambda _, args: seen.update(in1=args[0]))
    mixed(idx)
    torch.testing.assert_close(seen["in1"], seen["out0"] + seen["x0"])


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_byte_dropout_drops_p_of_the_values_and_keeps_the_expectation(p):
    """CPU dropout from random bytes: p rounded to 1/256, the kept values scaled so the mean stays, the gradient
    the same mask and scale, the same seed the same mask, eval the identity."""
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = byte_dropout(x, p)
    dropped = (y == 0).float().mean().item()
    q = round(p * 256) / 256
    assert abs(dropped - q) < 5 * math.sqrt(q * (1 - q) / x.numel())  # five standard errors
    assert abs(y.mean().item() - 1.0) < 0.01
    assert torch.equal(y.unique(), torch.tensor([0.0, 1 / (1 - q)]))
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, (y != 0).float() * 2 / (1 - q))
    torch.manual_seed(0)
    assert torch.equal(byte_dropout(x, p), y)
    assert torch.equal(byte_dropout(x, p), y) is False  # the next draw is another mask
    assert Dropout(p).eval()(x) is x and Dropout(0.0).train()(x) is x


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_attention_dropout_can_be_off_while_the_residuals_drop(arch):
    """`attn_dropout=0` with `dropout` > 0: training is random only through the residual and embedding dropout;
    with both 0 two training-mode passes agree, with attention dropout alone they do not."""
    idx = torch.randint(0, 61, (2, 8))

    def differs(**kw) -> bool:
        torch.manual_seed(0)
        model = GPT(tiny(arch=arch, **kw)).train()
        return not torch.equal(model(idx)[0], model(idx)[0])

    assert not differs(dropout=0.0, attn_dropout=0.0)
    assert differs(dropout=0.0, attn_dropout=0.5)  # attention dropout on its own
    assert differs(dropout=0.5, attn_dropout=0.0)  # residual dropout without it
    assert GPTConfig.model_validate(tiny(arch=arch, dropout=0.2).model_dump()).attention_dropout == 0.2


# -- bookkeeping -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_init_and_tying(arch):
    cfg = GPTConfig(arch=arch, vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg)
    assert model.lm_head.weight is model.wte.weight
    assert abs(model.wte.weight.std().item() - 0.02) < 2e-3
    resid = model.blocks[0].attn.c_proj.weight.std().item()
    assert abs(resid - 0.02 / math.sqrt(2 * 4)) < 1e-3
    untied = GPT(cfg.model_copy(update={"tie_embeddings": False}))
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() == model.num_params() + 256 * 128


def test_num_params_and_flops():
    cfg = tiny(arch="gpt2")
    model = GPT(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert model.num_params() == n
    assert model.num_params(non_embedding=True) == n - 32 * 32  # position table only (wte is tied)
    assert model.flops_per_token() == 6 * (n - 32 * 32) + 12 * 2 * 32 * 32


def test_configure_optimizer():
    model = GPT(tiny(arch="gpt2"))
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert decay["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("tied", [True, False])
def test_embedding_learning_rate_multiplier(optimizer, tied):
    """embed_lr_mult puts the embeddings in a group of their own, which the loop's `set_lr` steps mult times
    faster: AdamW's first step moves each weight with a gradient by lr, so the embedding moves 10x as far."""
    from tasks.train_worker import set_lr

    moved = {}
    for mult in (1.0, 10.0):
        torch.manual_seed(0)
        model = GPT(tiny(arch="llama", tie_embeddings=tied))
        opt = model.configure_optimizer(lr=1e-3, weight_decay=0.0, optimizer=optimizer, embed_lr_mult=mult)
        own = [g for g in opt.param_groups if "lr_mult" in g]
        assert len(own) == (mult != 1.0)
        assert not own or own[0]["params"] == [model.wte.weight]
        assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
        set_lr(opt, 1e-3)
        before = model.wte.weight.detach().clone()
        idx = torch.randint(0, 61, (2, 16))
        model(idx, idx)[1].backward()
        opt.step()
        moved[mult] = (model.wte.weight - before).abs().max().item()
    assert moved[10.0] == pytest.approx(10 * moved[1.0], rel=1e-3)


# -- checkpoint --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [ARCHS["gpt2"], ARCHS["llama_gqa"], dict(arch="gpt2", tie_embeddings=False)])
def test_save_load_round_trip(tmp_path, kw):
    model = build(tiny(**kw))
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    idx = torch.randint(0, 61, (2, 12))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert (loaded.lm_head.weight is loaded.wte.weight) == model.config.tie_embeddings


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)
    save_model(build(tiny()), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)


def test_load_rejects_mismatched_weights(tmp_path):
    save_model(build(tiny()), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_flex_doc_mask_equals_dense_mask(arch):
    """The FlexAttention BlockMask (used on GPU) attends exactly where the dense SDPA mask does: run every
    layer with each (forward only: FlexAttention has no CPU backward) and compare the logits."""
    from models.gpt import doc_block_mask

    eot = 0
    model = build(tiny(**ARCHS[arch], doc_mask=True, eot_id=eot))
    idx = torch.randint(1, 61, (2, 32))
    idx[0, [5, 6, 20]] = eot  # an empty document between two eots, and windows that end mid-document
    idx[1, 31] = eot
    dense = model._attention_mask(idx, None)
    assert isinstance(dense, torch.Tensor)
    block = doc_block_mask(idx, eot)

    def logits(mask):
        x = model.wte(idx)
        pos = model._positions(idx, None)  # (B, T): restarting at 0 in each document
        rope = None
        if model.wpe is not None:
            x = x + model.wpe(pos)
        else:
            rope = (model.rope_cos[pos].unsqueeze(1), model.rope_sin[pos].unsqueeze(1))
        for layer, blk in enumerate(model.blocks):
            x = blk(x, rope, mask, None, layer)
        return model.lm_head(model.ln_f(x))

    with torch.no_grad():
        torch.testing.assert_close(logits(block), logits(dense), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits(dense), model(idx)[0])  # the helper above is the model's own forward
