"""The model card and the lineage read from stage refs (no MLflow).
Run: pytest tests/unit/test_model_card.py -q"""

from __future__ import annotations

import json

import pytest

from models.checkpoint import save_model
from models.gpt import GPT, GPTConfig
from models.plan import flops_per_token
from tasks.model_card import card_facts, lineage, model_card
from tasks.refs import CorpusRef, ModelRef, TokenizerRef
from tasks.registry import Score


def _ref(cls, tmp_path, stage: str, inputs: dict, **kw):
    folder = tmp_path / stage
    folder.mkdir(exist_ok=True)
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"stage": stage, "inputs": inputs}))
    return cls(path=kw.pop("path", str(folder)), manifest=str(manifest), stage=stage, **kw)


@pytest.fixture
def refs(tmp_path):
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    save_model(GPT(cfg), tmp_path / "model")
    crawl = {"input_0": {"path": "/data/crawl/a.warc.gz", "sha256": "a" * 64},
             "input_1": {"path": "https://data.commoncrawl.org/b.wet.gz", "sha256": "b" * 64}}
    return {
        "data": _ref(CorpusRef, tmp_path, "data", crawl, counts={"totals": {"docs_out": 86, "chars_out": 9018}}),
        "tokenizer": _ref(TokenizerRef, tmp_path, "tokenizer", {"corpus": {"path": "/runs/docs", "sha256": "c" * 64}},
                          counts={"vocab_size": 64, "train_tokens": 1000, "val_tokens": 50}),
        "pretrain": _ref(ModelRef, tmp_path, "pretrain", {"shards": {"path": "/runs/shards", "sha256": "d" * 64}},
                         path=str(tmp_path / "model"), counts={"tokens": 4096}, metrics={"pretrain/mfu": 0.08},
                         seconds=12.5),
        "sft": _ref(ModelRef, tmp_path, "sft", {"model": {"path": "/runs/m", "sha256": "e" * 64},
                                                "tokenizer": {"path": "/runs/t", "sha256": "f" * 64},
                                                "data_alpaca": {"path": "/data/sft/alpaca.json.gz", "sha256": "9" * 64}},
                    seconds=3.0),
    }, cfg


def test_lineage_keeps_the_data_inputs_and_leaves_out_the_models(refs):
    found = lineage(refs[0])
    assert [(d.stage, d.name) for d in found] == [("data", "input_0"), ("data", "input_1"), ("tokenizer", "corpus"),
                                                  ("pretrain", "shards"), ("sft", "data_alpaca")]
    assert found[1].path == "https://data.commoncrawl.org/b.wet.gz" and found[1].sha256 == "b" * 64


def test_the_card_has_data_size_compute_scores_contamination_and_use(refs):
    facts = card_facts(refs[0], "sft", hardware="CPU, 2 cores")
    cfg = refs[1]
    assert facts.params == GPT(cfg).num_params()
    assert facts.flops == flops_per_token(cfg) * 4096 and facts.seconds == {"pretrain": 12.5, "sft": 3.0}
    card = model_card("gpt-test", facts, {"mean/acc": Score(value=0.31, stderr=0.02)}, {"arc_easy": 0.125})
    assert "Documents kept by the data stage: 86 (9,018 characters)" in card
    assert "| data | input_1 | `https://data.commoncrawl.org/b.wet.gz` | `bbbbbbbbbbbbbbbb` |" in card
    assert f"- Parameters: {GPT(cfg).num_params():,}" in card and "1 layers, 2 heads, width 16" in card
    assert "Context: 16 tokens" in card and "Hardware: CPU, 2 cores" in card and "MFU: 8.00%" in card
    assert "| mean/acc | 0.3100 ± 0.0200 |" in card and "| arc_easy | 12.50% |" in card
    assert "## Intended use and limits" in card
    bare = model_card("gpt-test", None, {"mean/acc": Score(value=0.31)}, None)  # registered outside a pipeline
    assert "## Data" not in bare and "| mean/acc | 0.3100 |" in bare


def test_the_card_shows_paths_a_reader_elsewhere_can_use(monkeypatch, tmp_path):
    from infra.env import REPO_ROOT
    from tasks.model_card import shown

    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path / "home"))
    assert shown(str(REPO_ROOT / "data" / "crawl" / "a.warc.gz")) == "data/crawl/a.warc.gz"
    assert shown(str(tmp_path / "home" / "runs" / "data" / "k" / "documents")) == "$GPTFLOW_HOME/runs/data/k/documents"
    assert shown("https://data.commoncrawl.org/b.wet.gz") == "https://data.commoncrawl.org/b.wet.gz"
    assert shown("/elsewhere/c.warc.gz") == "/elsewhere/c.warc.gz"  # outside both: in full
