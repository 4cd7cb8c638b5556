"""Packing SFT conversations: a packed conversation's logits equal its logits alone (learned positions and RoPE),
no conversation attends to another, only assistant tokens carry targets, and SFT's data order and per-token loss
weights. Run: `pytest tests/unit/test_packing.py -q`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.gpt import GPT, GPTConfig
from models.tokens import END, EOT, PAD, role_token
from tasks.bpe import train_bpe
from tasks.chat import IGNORE, render
from tasks.packing import Windows, batch, fit_rows, pack, pad_rows
from tasks.sft_worker import SFTBatches
from tasks.tokenizer import TokenizerConfig
from tasks.train_worker import train_step

pytestmark = pytest.mark.usefixtures("one_thread")

EOT_ID = 0
ARCHS = {"gpt2": dict(arch="gpt2"), "llama": dict(arch="llama", n_kv_head=2)}


def _model(arch: str, doc_mask: bool) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=61, block_size=64, n_layer=2, n_head=4, n_embd=32, doc_mask=doc_mask,
                    eot_id=EOT_ID, **ARCHS[arch])
    model = GPT(cfg)
    with torch.no_grad():  # weights large enough that every position and key matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _convos(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 61, (n,), generator=g).tolist() + [EOT_ID] for n in lengths]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_packed_conversation_has_the_logits_it_has_alone(arch):
    packed_model, alone_model = _model(arch, doc_mask=True), _model(arch, doc_mask=False)
    convos = _convos([20, 7, 30])
    window = torch.tensor([sum(convos, [])])  # (1, 60)
    with torch.no_grad():
        packed = packed_model(window)[0][0]
        start = 0
        for c in convos:
            alone = alone_model(torch.tensor([c]))[0][0]  # the conversation by itself, positions 0.. , no mask
            torch.testing.assert_close(packed[start : start + len(c)], alone, atol=1e-5, rtol=1e-5)
            start += len(c)
        # and the packing matters: the plain model on the packed window sees across conversations
        assert not torch.allclose(alone_model(window)[0][0][27:], packed[27:], atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_attention_across_packed_conversations(arch):
    model = _model(arch, doc_mask=True)
    a, b, c = _convos([15, 15, 15])
    a2 = _convos([14], seed=1)[0]  # the first conversation replaced by another, one token shorter
    with torch.no_grad():
        one = model(torch.tensor([a + b + c]))[0][0]
        two = model(torch.tensor([[1] + a2 + b + c]))[0][0]  # same length: a stray token, then a2 + eot
    assert not torch.allclose(one[:16], two[:16])
    torch.testing.assert_close(one[16:], two[16:], atol=1e-5, rtol=1e-5)  # b and c: unchanged


# ---------------------------------------------------------------- real chat rendering and packing


@pytest.fixture(scope="module")
def tok():
    texts = [f"Question {i}: what is {i} plus {i}? The answer is {2 * i}. Be brief and kind." for i in range(80)]
    return train_bpe(iter(texts), TokenizerConfig(vocab_size=320, min_frequency=1), parallel=False)


def _chat(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"what is {i} plus {i}?"},
            {"role": "assistant", "content": f"The answer is {2 * i}."},
            {"role": "user", "content": "and kind?"},
            {"role": "assistant", "content": "Be kind."}]


def test_only_assistant_tokens_are_targets_in_a_packed_multi_turn_batch(tok):
    eot, pad, end = tok.token_to_id(EOT), tok.token_to_id(PAD), tok.token_to_id(END)
    rows, counts = fit_rows([render(_chat(i), tok, 10**9) for i in range(12)], 128, eot, "truncate")
    assert counts == {"truncated": 0, "skipped_too_long": 0, "skipped_no_assistant_after_cut": 0}
    windows = pack(rows, 128, pad)
    assert windows.ids.shape[1] == 129 and len(windows.lengths) <= 4  # several conversations per window
    x, y = batch(windows, np.arange(len(windows.lengths)))
    want = []  # what the assistant says, turn by turn, each closed by <|end|>
    for i in range(12):
        for text in (f"The answer is {2 * i}.", "Be kind."):
            want.append(tok.encode(text, add_special_tokens=False).ids + [end])
    got, turn = [], []
    for xr, yr in zip(x.tolist(), y.tolist(), strict=True):
        for t, target in enumerate(yr):
            if target == IGNORE:
                continue
            nxt = xr[t + 1] if t + 1 < len(xr) else None
            assert nxt in (None, target)  # the target is the next input token: labels line up with ids
            turn.append(target)
            if target == end:
                got.append(turn)
                turn = []
    assert got == want  # every assistant token, and nothing else: no system, user, role, eot or pad token
    assistant = tok.token_to_id(role_token("assistant"))
    assert assistant not in {t for row in got for t in row}


def test_too_long_conversations_are_truncated_or_skipped_and_counted(tok):
    eot = tok.token_to_id(EOT)
    long = render(_chat(1) * 6, tok, 10**9)
    short = render(_chat(2), tok, 10**9)
    assert len(long[0]) > 64 >= len(short[0])
    rows, counts = fit_rows([long, short], 64, eot, "truncate")
    assert counts["truncated"] == 1 and [len(r[0]) for r in rows] == [65, len(short[0]) + 1]
    assert rows[0][0][-1] == eot and rows[0][0][:64] == long[0][:64]
    rows, counts = fit_rows([long, short], 64, eot, "skip")
    assert counts["skipped_too_long"] == 1 and rows == [(short[0] + [eot], short[1] + [IGNORE])]
    prompt_only = render([{"role": "user", "content": "what " * 80}, {"role": "assistant", "content": "ok"}], tok, 10**9)
    rows, counts = fit_rows([prompt_only], 64, eot, "truncate")  # the cut leaves no assistant token
    assert rows == [] and counts["skipped_no_assistant_after_cut"] == 1


def test_packing_needs_less_padding_than_one_conversation_per_window(tok, tmp_path):
    eot, pad = tok.token_to_id(EOT), tok.token_to_id(PAD)
    chats = [_chat(i) if i % 3 else _chat(i)[:3] for i in range(20)]  # one turn or two: rows of two lengths
    rows, _ = fit_rows([render(c, tok, 10**9) for c in chats], 128, eot, "truncate")
    packed, padded = pack(rows, 128, pad), pad_rows(rows, 128, pad)
    assert packed.pad_share < 0.3 < padded.pad_share
    assert packed.lengths.sum() == padded.lengths.sum() == sum(len(r[0]) for r in rows)  # nothing dropped
    pieces = []  # every conversation exactly once, whole, with its labels: the windows cut at each eot
    for ids, labels, n in zip(packed.ids.tolist(), packed.labels.tolist(), packed.lengths.tolist(), strict=True):
        ends = [i + 1 for i, t in enumerate(ids[:n]) if t == eot]
        pieces += [(ids[a:b], labels[a:b]) for a, b in zip([0] + ends[:-1], ends, strict=True)]
        assert ends[-1] == n and all(t == pad for t in ids[n:])
    assert sorted(pieces) == sorted(rows)
    packed.save(tmp_path)
    again = Windows.load(tmp_path)
    assert np.array_equal(again.ids, packed.ids) and np.array_equal(again.labels, packed.labels)


def test_padded_batches_hold_one_conversation_per_row_trimmed_to_the_longest(tok):
    eot, pad = tok.token_to_id(EOT), tok.token_to_id(PAD)
    rows, _ = fit_rows([render(_chat(1)[:3], tok, 10**9), render(_chat(2), tok, 10**9)], 128, eot, "truncate")
    windows = pad_rows(rows, 128, pad)
    x, y = batch(windows, np.array([0]))
    assert x.shape == (1, len(rows[0][0]) - 1)  # trimmed to the row itself: no padding at all
    x, y = batch(windows, np.array([0, 1]))
    short = len(rows[0][0])
    assert x.shape == (2, len(rows[1][0]) - 1) and (x[0, short:] == pad).all() and (y[0, short - 1:] == IGNORE).all()


# ---------------------------------------------------------------- SFT batches: order and per-token weights


def _windows(tmp_path, n: int) -> SFTBatches:
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        ids = g.integers(1, 61, size=(n, 17)).astype(np.int32)
        labels = np.where(g.random((n, 17)) < 0.3, ids, IGNORE).astype(np.int32)  # a varying share of targets
        Windows(ids, labels, np.full(n, 17, dtype=np.int32)).save(tmp_path / split)
    return SFTBatches(tmp_path)


def _worker(rank: int, world: int, accum: int, batch_size: int):
    return SimpleNamespace(cfg=SimpleNamespace(seed=3, batch_size=batch_size), rank=rank, world=world, accum=accum,
                           device=torch.device("cpu"))


def test_each_window_is_drawn_once_per_epoch_as_a_function_of_seed_step_and_rank(tmp_path):
    data = _windows(tmp_path, 12)
    seen = []
    for step in range(3):  # 3 steps x 2 ranks x 2 micro-batches x 1 window = 12 windows: one epoch
        for rank in range(2):
            seen += _draws(data, rank, step)
    assert sorted(seen) == list(range(12))
    fresh = SFTBatches(tmp_path)  # a resumed run: the same windows at the same (step, rank)
    for step, rank in [(2, 1), (0, 0), (5, 1)]:
        assert _draws(fresh, rank, step) == _draws(data, rank, step)


def _draws(data: SFTBatches, rank: int, step: int) -> list[int]:
    """The windows rank `rank` of 2 draws at `step` (2 micro-batches of 1 window)."""
    return [int(r[0]) for r in data.step_rows(3, step, rank, 2, 2, 1)]


def test_step_loss_is_the_mean_over_every_assistant_token_of_the_step(tmp_path):
    data = _windows(tmp_path, 8)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, block_size=16, n_layer=1, n_head=2, n_embd=16))
    w = _worker(0, 1, 3, 2)
    micro = data.micro_batches(w, step=0)
    scales = [s for *_, s in micro]
    assert len(scales) == 3 and sum(scales) == pytest.approx(1.0) and len(set(scales)) > 1  # weights by tokens
    x = torch.cat([m[0] for m in micro])
    y = torch.cat([m[1] for m in micro])
    with torch.no_grad():
        want = model(x, y)[1].item()  # one cross-entropy over every target of the step
    opt = model.configure_optimizer(0.0, 0.0)
    loss, _ = train_step(model, opt, micro, 3, 1.0, torch.device("cpu"), torch.autocast("cpu", enabled=False), False)
    assert loss.item() == pytest.approx(want, rel=1e-5)
