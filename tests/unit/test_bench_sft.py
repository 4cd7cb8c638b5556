"""bench.sft at a tiny size: each variant trains on the same real Alpaca conversations and reports what it trained;
packed and padded batches hold the same conversations, so they train the same targets to the same loss.

Run: `.venv/bin/python -m pytest tests/unit/test_bench_sft.py -q` (~25 s; the `slow` one runs two of the
bench's subprocesses, ~20-40 s on a busy machine).
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


@pytest.fixture(scope="module")
def in_process(one_thread) -> list[dict]:
    args, _ = parse(TINY)
    return [run_variant(v, args) for v in VARIANTS]


def test_variants_in_process_train_the_same_batches(in_process):
    check_rows(in_process)


# What a run does not decide (speed, memory) aside, a variant's row is a function of the arguments.
TIMED = {"tokens_per_s", "peak_mib", "loaded_mib", "seconds"}


@pytest.mark.slow
def test_bench_runs_each_variant_in_its_own_process(in_process, tmp_path, capsys):
    """The bench's own path: each variant in a fresh interpreter, its row read back from the child's RESULT line.
    Two children (one full, one LoRA on packed batches) stand for the five: the child path does not depend on the
    variant, and each child's row must equal the in-process row that `check_rows` checked above."""
    rows = main([*TINY, "--variants", "full", "lora-pack", "--out", str(tmp_path / "sft.json")])
    assert json.loads((tmp_path / "sft.json").read_text())["rows"] == rows
    want = {r["variant"]: r for r in in_process}
    assert [r["variant"] for r in rows] == ["full", "lora-pack"]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["peak_mib"] == row["peak_mib"]  # not NaN
        same = {k: v for k, v in row.items() if k not in TIMED | {"final_loss"}}
        assert same == {k: v for k, v in want[row["variant"]].items() if k not in TIMED | {"final_loss"}}
        assert row["final_loss"] == pytest.approx(want[row["variant"]]["final_loss"], abs=1e-4)
    assert "lora-pack   packed" in capsys.readouterr().out
