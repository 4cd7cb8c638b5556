"""The chunked output head + cross-entropy (`loss_chunk`): the same loss and gradients as lm_head + F.cross_entropy."""

from __future__ import annotations

import pytest
import torch

from models.gpt import GPT, GPTConfig
from models.head_loss import chunked_head_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def pair(chunk: int, **kw) -> tuple[GPT, GPT]:
    """Two models with the same weights, the second computing its loss in chunks of `chunk` tokens."""
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, **kw)
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**base))
    chunked = GPT(GPTConfig(**base, loss_chunk=chunk))
    chunked.load_state_dict(plain.state_dict())
    return plain, chunked


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    idx, targets = torch.randint(0, 97, (3, 25)), torch.randint(0, 97, (3, 25))
    targets[0, :10] = -100  # a prompt that does not count
    targets[2, 20:] = -100
    return idx, targets


def grads(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("tie", [True, False])
def test_same_loss_and_gradients(arch, tie):
    plain, chunked = pair(16, arch=arch, tie_embeddings=tie)  # 75 tokens: 4 full chunks and one of 11
    idx, targets = batch()
    ref = plain(idx, targets)[1]
    logits, loss = chunked(idx, targets)
    assert logits is None
    torch.testing.assert_close(loss, ref)
    (0.5 * ref).backward()  # a scaled loss, as in gradient accumulation: backward must use the incoming gradient
    (0.5 * loss).backward()
    a, b = grads(plain), grads(chunked)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_every_target_ignored_gives_zero_loss_and_gradients():
    _, chunked = pair(8)
    idx, targets = batch()
    loss = chunked(idx, torch.full_like(targets, -100))[1]
    loss.backward()
    assert loss.item() == 0.0
    assert all(g.abs().max() == 0 for g in grads(chunked).values() if g is not None)


def test_bf16_autocast_is_close_to_plain():
    plain, chunked = pair(32)
    idx, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, loss = plain(idx, targets)[1], chunked(idx, targets)[1]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    ref.backward()
    loss.backward()
    a, b = grads(plain), grads(chunked)
    for name in a:
        scale = a[name].abs().max()
        assert (b[name] - a[name]).abs().max() <= 2e-2 * scale, name


def test_no_grad_and_frozen_head():
    plain, chunked = pair(10)
    idx, targets = batch()
    with torch.no_grad():
        torch.testing.assert_close(chunked(idx, targets)[1], plain(idx, targets)[1])
    logits, _ = chunked(idx)  # without targets: the logits, as always
    assert logits.shape == (3, 25, 97)
    for model in (plain, chunked):  # a frozen head (tied: the embedding too) still passes gradients down
        model.lm_head.weight.requires_grad_(False)
        model(idx, targets)[1].backward()
    assert chunked.lm_head.weight.grad is None
    torch.testing.assert_close(chunked.blocks[0].attn.c_attn.weight.grad, plain.blocks[0].attn.c_attn.weight.grad)


def test_function_matches_cross_entropy_on_raw_tensors():
    torch.manual_seed(2)
    h = torch.randn(2, 7, 5, requires_grad=True)
    w = torch.randn(11, 5, requires_grad=True)
    t = torch.randint(0, 11, (2, 7))
    t[1, 3] = -100
    loss = chunked_head_loss(h, w, t, 3)
    ref = torch.nn.functional.cross_entropy((h @ w.t()).reshape(-1, 11), t.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    gh, gw = torch.autograd.grad(loss, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
