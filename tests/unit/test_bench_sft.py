"""bench.sft at a tiny size: each variant trains on the same real Alpaca conversations and reports what it trained;
packed and padded batches hold the same conversations, so they train the same targets to the same loss.

Run: `.venv/bin/python -m pytest tests/unit/test_bench_sft.py -q` (~25 s; the `slow` one runs the bench's
subprocesses, ~40-100 s on a busy machine).
"""

from __future__ import annotations

import json

import pytest

from bench.sft import VARIANTS, main, parse, run_variant

pytest.importorskip("peft")
TINY = ["--layers", "1", "--embd", "32", "--heads", "2", "--context", "256", "--examples", "24", "--batch", "4",
        "--steps", "2", "--threads", "1", "--device", "cpu"]


def lora_size(n_embd: int, ffn: int, rank: int) -> int:
    """A (r x in) + B (out x r) on c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj of one GPT-2 block."""
    shapes = [(n_embd, 3 * n_embd), (n_embd, n_embd), (n_embd, ffn), (ffn, n_embd)]
    return sum(rank * (i + o) for i, o in shapes)


def check_rows(rows: list[dict]) -> None:
    full, lora, drop, full_pack, lora_pack = rows
    assert [(r["variant"], r["batching"]) for r in rows] == [
        ("full", "padded"), ("lora", "padded"), ("lora-drop", "padded"), ("full-pack", "packed"),
        ("lora-pack", "packed")]
    assert drop["trainable"] == lora["trainable"] and drop["tokens"] == lora["tokens"]
    assert full["trainable"] == full["total"] and full["trainable_share"] == 1.0
    assert lora["trainable"] == lora_size(32, 128, VARIANTS[1].lora.rank)
    assert lora["total"] == full["total"] + lora["trainable"]  # the adapters come on top of the same base
    assert full["tokens"] == lora["tokens"] > 0  # the same batches in both
    assert 0 < full["pad_share"] == lora["pad_share"] < 1
    assert all(r["tokens_per_s"] > 0 and r["peak_mib"] == r["peak_mib"] for r in rows)  # not NaN
    assert 9 < full["final_loss"] < 12  # ~ln(50,304) = 10.8 at the start
    # packed: the same conversations in fewer, fuller rows; the same assistant targets, and (document mask,
    # positions restarting per conversation) the same losses as padded, to float rounding
    for packed, padded in ((full_pack, full), (lora_pack, lora)):
        assert packed["targets"] == padded["targets"] > 0
        assert packed["trainable"] == padded["trainable"] and packed["total"] == padded["total"]
        assert packed["final_loss"] == pytest.approx(padded["final_loss"], abs=1e-4)
        # real input tokens: the same, plus up to two per packed conversation (its last token and its eot)
        assert padded["tokens"] < packed["tokens"] <= padded["tokens"] + 2 * sum(padded["rows_per_step"])
        assert sum(packed["rows_per_step"]) < sum(padded["rows_per_step"])  # windows vs conversations
    assert 0 <= full_pack["pad_share"] == lora_pack["pad_share"] < full["pad_share"]
    assert full_pack["pad_share"] < 0.1 < full["pad_share"]


@pytest.mark.usefixtures("one_thread")
def test_variants_in_process_train_the_same_batches():
    args, _ = parse(TINY)
    check_rows([run_variant(v, args) for v in VARIANTS])


@pytest.mark.slow
def test_bench_runs_each_variant_in_its_own_process(tmp_path, capsys):
    rows = main([*TINY, "--out", str(tmp_path / "sft.json")])
    check_rows(rows)
    assert json.loads((tmp_path / "sft.json").read_text())["rows"] == rows
    assert "lora   padded" in capsys.readouterr().out
