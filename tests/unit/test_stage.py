"""Stage folders: same inputs and parameters reuse the folder, a changed byte or parameter does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.refs import CorpusRef, Ref
from tasks.stage import GptflowError, path_sha256, run_stage
from tasks.tokenizer import TokenizerConfig


def test_rerun_is_skipped_and_changes_are_not(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello")
    calls = []

    def core(out):
        calls.append(out)
        (out / "result.txt").write_text(src.read_text().upper())
        return Ref(path=str(out / "result.txt"), counts={"n": 1}, files={"result": str(out / "result.txt")})

    cfg = TokenizerConfig(vocab_size=300)
    first = run_stage("s", cfg, {"src": src}, core, tmp_path / "runs")
    again = run_stage("s", cfg, {"src": src}, core, tmp_path / "runs")
    assert len(calls) == 1 and again.cached and not first.cached and again.key == first.key
    manifest = json.loads((tmp_path / "runs" / "s" / first.key / "manifest.json").read_text())
    assert manifest["inputs"]["src"]["sha256"] == path_sha256(src)
    assert manifest["params"]["vocab_size"] == 300 and manifest["counts"] == {"n": 1}
    run_stage("s", TokenizerConfig(vocab_size=301), {"src": src}, core, tmp_path / "runs")
    src.write_text("hello!")
    third = run_stage("s", cfg, {"src": src}, core, tmp_path / "runs")
    assert len(calls) == 3 and third.key != first.key


def test_failed_stage_is_not_marked_done(tmp_path):
    def boom(out):
        (out / "partial").write_text("work so far")
        raise RuntimeError("killed")

    src = tmp_path / "in.txt"
    src.write_text("x")
    with pytest.raises(RuntimeError):
        run_stage("s", TokenizerConfig(), {"src": src}, boom, tmp_path)
    (folder,) = (p for p in (tmp_path / "s").iterdir() if p.is_dir())  # next to it: its `<key>.lock`
    assert (folder / "partial").exists() and not (folder / "_SUCCESS").exists()


def test_missing_input_names_the_stage_and_path(tmp_path):
    with pytest.raises(GptflowError, match=r"s: input 'src' does not exist: .*nope"):
        run_stage("s", TokenizerConfig(), {"src": tmp_path / "nope"}, lambda out: Ref(path=str(out)), tmp_path)


def test_folder_hash_sees_content_and_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("1")
    h1 = path_sha256(tmp_path / "a")
    (tmp_path / "a" / "f").write_text("2")
    h2 = path_sha256(tmp_path / "a")
    (tmp_path / "a" / "f").rename(tmp_path / "a" / "g")
    assert len({h1, h2, path_sha256(tmp_path / "a")}) == 3


def test_tokenizer_manifest_lists_every_shard_with_its_hash(tmp_path):
    from infra.env import DATA_DIR
    from tasks.tokenizer import build_tokenizer

    corpus = CorpusRef(path=str(DATA_DIR / "text" / "c4_demo.jsonl.gz"))  # a user's file: no sha256 yet
    cfg = TokenizerConfig(vocab_size=300, shard_tokens=20_000)
    ref = run_stage("tokenizer", cfg, {"corpus": corpus}, lambda out: build_tokenizer(cfg, corpus, out), tmp_path)
    m = json.loads(Path(ref.manifest).read_text())
    assert m["inputs"]["corpus"]["sha256"] == path_sha256(corpus.path)
    assert ref.shards.sha256 == path_sha256(ref.shards.path) and ref.sha256 == path_sha256(ref.path)
    shards = {k: v for k, v in m["outputs"].items() if k.startswith("shard/")}
    assert len(shards) > 2 and any("val_" in k for k in shards)
    for v in shards.values():
        assert v["sha256"] == path_sha256(Path(v["path"]))
