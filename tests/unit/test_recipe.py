"""The pretraining quality recipe's parts: the held-out tail split, bits per byte over a whole split, and Muon
beside AdamW (no Ray here; the Ray fit with both is in test_budget.py).

Run: `.venv/bin/python -m pytest tests/unit/test_recipe.py -x -q`
"""

from __future__ import annotations

import copy
import gzip
import json
import math

import numpy as np
import pytest
import torch

from flows.presets import resolve
from infra.env import DATA_DIR
from models.gpt import GPT, GPTConfig
from models.optim import Muon, MuonAdamW, orthogonalize
from tasks.heldout import score_windows, split_bits_per_byte
from tasks.pretrain import PretrainConfig
from tasks.refs import CorpusRef
from tasks.tokenizer import build_tokenizer, tail_split

SHAKESPEARE = DATA_DIR / "text" / "tinyshakespeare.txt.gz"


def test_tail_split_cuts_the_last_share_of_characters_across_documents():
    docs = [("aaaa", "x"), ("bbbbbb", None), ("cc", "y")]  # 12 characters: the last 25% are "bcc"
    assert tail_split(docs, 0.25) == [("aaaa", "x", "train"), ("bbbbb", None, "train"), ("b", None, "val"),
                                      ("cc", "y", "val")]
    assert tail_split(docs, 0.5) == [("aaaa", "x", "train"), ("bb", None, "train"), ("bbbb", None, "val"),
                                     ("cc", "y", "val")]


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare")
    cfg = resolve("shakespeare").tokenizer
    build_tokenizer(cfg, CorpusRef(path=str(SHAKESPEARE)), out)
    return out / "shards"


def test_the_recipe_holds_out_the_texts_last_tenth_and_its_tokenizer_never_saw_it(shakespeare):
    text = gzip.open(SHAKESPEARE, "rt", encoding="utf-8").read()
    cut = round(len(text) * 0.9)
    index = json.loads((shakespeare / "index.json").read_text())
    assert index["splits"]["val"]["bytes"] == len(text[cut:].encode("utf-8"))
    assert index["splits"]["train"]["bytes"] == len(text[:cut].encode("utf-8"))
    # the tokenizer was trained on the first 90% only: it compresses its own training text better than the tail
    bpt = {s: index["splits"][s]["bytes"] / index["splits"][s]["tokens"] for s in ("train", "val")}
    assert bpt["train"] > bpt["val"]


def test_bits_per_byte_of_a_uniform_model_is_log2_of_the_vocabulary_per_byte(shakespeare):
    index = json.loads((shakespeare / "index.json").read_text())
    model = GPT(GPTConfig(arch="llama", vocab_size=index["vocab_size"], block_size=64, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        model.wte.weight.zero_()  # tied head: every logit 0, every token 1/V
    val = index["splits"]["val"]
    expected = (val["tokens"] - 1) * math.log2(index["vocab_size"]) / val["bytes"]  # every token but the first, once
    assert split_bits_per_byte(model, shakespeare, batch=7) == pytest.approx(expected, rel=1e-6)
    assert split_bits_per_byte(model, shakespeare, batch=7, stride=24) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("n", "context", "stride"), [(1, 4, 4), (2, 4, 4), (5, 8, 3), (100, 8, 8), (100, 8, 3),
                                                       (101, 16, 1), (57, 10, 7)])
def test_sliding_windows_score_every_token_once_with_at_least_context_minus_stride_before_it(n, context, stride):
    scored = []
    for start, first in score_windows(n, context, stride):
        end = min(start + context, n - 1)  # the window's last target
        assert 0 <= start and end - start <= context
        for t in range(start + 1 + first, end + 1):
            scored.append(t)
            assert t - start >= min(context - stride + 1, t)  # ids before t that the window reads
    assert scored == list(range(1, n))


@pytest.mark.parametrize("stride", [8, 3, 1])
def test_the_batched_sliding_score_equals_scoring_each_token_on_its_own(tmp_path, stride):
    ids = np.random.default_rng(0).integers(0, 50, 61).astype(np.uint16)
    ids.tofile(tmp_path / "val.bin")
    index = {"dtype": "uint16", "splits": {"val": {"bytes": 150, "tokens": 61, "shards": [{"file": "val.bin"}]}}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="llama", vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    x = torch.from_numpy(ids.astype(np.int64))
    nats = 0.0
    for start, first in score_windows(len(x), 8, stride):  # each token from the window the plan gives it
        for t in range(start + 1 + first, min(start + 8, len(x) - 1) + 1):
            with torch.no_grad():
                logits = model(x[None, start:t])[0][0, -1]
            nats -= torch.log_softmax(logits, -1)[x[t]].item()
    assert split_bits_per_byte(model, tmp_path, batch=3, stride=stride) == pytest.approx(nats / math.log(2) / 150,
                                                                                          rel=1e-5)
    with pytest.raises(ValueError, match="stride"):
        split_bits_per_byte(model, tmp_path, stride=9)


def test_a_held_out_stride_longer_than_the_context_is_a_config_error():
    cfg = resolve("shakespeare").pretrain.model_dump()
    with pytest.raises(ValueError, match=r"heldout_stride \(257\) must not exceed the context, model.block_size \(256\)"):
        PretrainConfig.model_validate({**cfg, "heldout_stride": 257})
    assert PretrainConfig.model_validate({**cfg, "heldout_stride": 256}).heldout_stride == 256


def _train(steps: int, resume_at: int | None = None) -> list[float]:
    cfg = GPTConfig(arch="llama", vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)
    batches = [torch.from_numpy(np.random.default_rng(i).integers(0, 64, (4, 17))) for i in range(2)]
    data = [batches[i % 2] for i in range(steps)]  # two batches again and again: learnable
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = model.configure_optimizer(1e-2, 0.1, optimizer="muon")
    losses = []
    for i, x in enumerate(data):
        if i == resume_at:  # a fresh model and optimizer from the saved states, as a resumed run builds them
            weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
            torch.manual_seed(1)
            model = GPT(cfg)
            model.load_state_dict(weights)
            opt = model.configure_optimizer(1e-2, 0.1, optimizer="muon")
            opt.load_state_dict(state)
        loss = model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_muon_takes_the_blocks_matrices_and_resumes_exactly_from_its_state():
    model = GPT(GPTConfig(arch="llama", vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))
    opt = model.configure_optimizer(1e-2, 0.1, optimizer="muon")
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")}
    assert "wte.weight" not in muon and len(opt.param_groups) == 3
    whole, resumed = _train(8), _train(8, resume_at=4)
    assert resumed == whole
    assert whole[-1] < whole[0]


def test_muon_is_refused_with_fsdp():
    model = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(ValueError, match="optimizer=muon .* use strategy=ddp"):
        PretrainConfig(model=model, optimizer="muon", strategy="fsdp", num_workers=2)


def test_our_muon_in_bf16_is_torchs_and_in_fp32_orthogonalises_alike():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(96, 32)), torch.nn.Parameter(torch.randn(16, 48))]
    theirs = [torch.nn.Parameter(w.detach().clone()) for w in ours]
    a = Muon(ours, lr=1e-2, weight_decay=0.1, ns_dtype=torch.bfloat16)
    b = torch.optim.Muon(theirs, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for w, v in zip(ours, theirs, strict=True):
            w.grad = torch.randn_like(w)
            v.grad = w.grad.clone()
        a.step()
        b.step()
    for w, v in zip(ours, theirs, strict=True):
        assert torch.equal(w, v)
    g = torch.randn(96, 32)
    fp32, bf16 = orthogonalize(g, dtype=torch.float32), orthogonalize(g, dtype=torch.bfloat16).float()
    singular = torch.linalg.svdvals(fp32)
    assert 0.5 < singular.min() and singular.max() < 1.5  # near-orthogonal, as the quintic iteration leaves it
    assert (fp32 - bf16).abs().max() < 0.05


def test_muon_orthogonalises_same_shape_matrices_in_one_batch_as_it_would_one_by_one():
    torch.manual_seed(0)
    stack = torch.randn(3, 96, 32)
    batched = orthogonalize(stack, dtype=torch.float32)
    for g, o in zip(stack, batched, strict=True):
        torch.testing.assert_close(o, orthogonalize(g, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    together = [torch.nn.Parameter(torch.randn(32, 96)) for _ in range(3)]  # one shape: one batched step
    alone = [torch.nn.Parameter(w.detach().clone()) for w in together]
    start = [w.detach().clone() for w in together]
    opts = [Muon(together, lr=1e-2, weight_decay=0.1)] + [Muon([w], lr=1e-2, weight_decay=0.1) for w in alone]
    for _ in range(3):
        for w, v in zip(together, alone, strict=True):
            w.grad = torch.randn_like(w)
            v.grad = w.grad.clone()
        for opt in opts:
            opt.step()
    for w, v, w0 in zip(together, alone, start, strict=True):
        torch.testing.assert_close(w, v, atol=1e-6, rtol=1e-5)
        assert (w - w0).abs().max() > 1e-3  # the steps moved it
