"""C4's three-sentence span dedup in the data stage, on a hand-written corpus run through the real datatrove stages.

Run: `.venv/bin/python -m pytest tests/unit/test_data_sentence_dedup.py -q` (about 10 s on 2 cores).
"""

import gzip
import json

import pytest

from infra.env import setup_env

setup_env()

from tasks.data import DataConfig, build_corpus, crawl_inputs  # noqa: E402

# A three-sentence span shared by two documents (one copy must go), and one that makes a short document redundant.
HARBOUR = [
    "The harbour lights were switched off for good on a foggy night in November.",
    "Nobody in the village could remember a winter without the slow sweep of the beam.",
    "Fishermen gathered on the pier to watch the last keeper lock the door of the tower.",
]
ORCHARD = [
    "Every autumn the orchard behind the old school fills with the smell of ripe apples.",
    "Children from the lower classes are allowed to pick the fruit that has fallen into the grass.",
    "The best apples are pressed into juice and sold at the market to pay for new books.",
]
# Two sentences shared by two documents: shorter than a span, so both copies stay.
PAIR = [
    "The railway bridge over the river was painted bright green in the spring.",
    "Trains still slow down there because the curve on the far bank is very tight.",
]

OWN = {
    "a": [
        "Our town museum has opened a small exhibition about the coast and its people.",
        "Old photographs show the fishing fleet leaving the bay before sunrise.",
        "A wooden model of the lighthouse stands in the middle of the first room.",
        "Visitors can listen to recordings of the foghorn and the radio messages of the coastguard.",
        "The curator spent two years collecting letters from the families of former keepers.",
    ],
    "a_end": ["Entry to the exhibition is free for children and students until the end of the year."],
    "b": [
        "My grandfather worked on the trawlers for most of his life and rarely talked about it.",
        "He kept a small notebook with the weather of every trip he had ever made.",
        "Reading it now feels like opening a window onto a world that has disappeared.",
        "Storms are described in a few calm words, as if they were ordinary working days.",
        "On the last pages he wrote about the night the coast finally went dark.",
    ],
    "b_end": [
        "He closed the notebook after that entry and never wrote in it again.",
        "We keep it on the shelf next to his compass and his old wool cap.",
    ],
    "c": [
        "Cycling along the river is the easiest way to see the valley in a single afternoon.",
        "The path is flat and well marked, and there are benches every few kilometres.",
        "Halfway along you reach the old mill, which now serves tea and cakes.",
        "From the terrace of the mill there is a fine view of the weir and the meadows.",
    ],
    "c_end": ["Come back before dark, because the path has no lights after the mill."],
    "d": [
        "The regional council has published its plan for the transport network.",
        "Several branch lines will get new signals and longer platforms next year.",
        "Passengers have asked for later evening services on weekdays and on Sundays.",
        "The council says it will answer every letter it receives before the summer.",
    ],
    "d_end": ["A public meeting about the plan will take place in the town hall in May."],
    "f": [
        "The parents association met on Thursday evening to plan the harvest festival.",
        "Volunteers will build the stalls and decorate the hall with paper lanterns.",
        "There will be a raffle with prizes donated by shops from the high street.",
    ],
    "f_end": ["Anyone who can bake a cake for the festival should speak to the school office."],
    "e_end": ["Thank you to all who helped."],
}


def text(*parts: list[str]) -> str:
    return " ".join(s for part in parts for s in part)


DOCS = {
    "a.jsonl.gz": [
        ("doc_a", text(OWN["a"], HARBOUR, OWN["a_end"])),
        ("doc_c", text(OWN["c"], PAIR, OWN["c_end"])),
        ("doc_f", text(OWN["f"], ORCHARD, OWN["f_end"])),
        ("doc_e", text(ORCHARD, OWN["e_end"])),  # after doc_f in the same file: its copy of the span is the later one
    ],
    "b.jsonl.gz": [
        ("doc_b", text(OWN["b"], HARBOUR, OWN["b_end"])),
        ("doc_d", text(OWN["d"], PAIR, OWN["d_end"])),
    ],
}


@pytest.fixture(scope="module")
def deduped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sentence_dedup")
    for name, docs in DOCS.items():
        with gzip.open(folder / name, "wt") as f:
            f.writelines(json.dumps({"id": doc_id, "text": t}) + "\n" for doc_id, t in docs)
    # Only what this test is about: reading, language ID (kept: plain English), span dedup. Two tasks, one file each,
    # so the shared span is found across tasks.
    cfg = DataConfig(
        inputs=[],
        text_sources={str(folder / name): 1.0 for name in DOCS},
        gopher_repetition=False,
        gopher_quality=False,
        c4_quality=False,
        c4_badwords=False,
        exact_dedup=False,
        minhash=False,
        pii=False,
    )
    out = folder / "out"
    result = build_corpus(cfg, crawl_inputs(cfg), out)
    kept = {}
    for path in sorted((out / "documents").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            kept |= {r["id"]: r["text"] for r in map(json.loads, f)}
    return result, kept, out


def test_a_shared_three_sentence_span_is_kept_once(deduped):
    _, kept, _ = deduped
    with_span = [d for d in ("doc_a", "doc_b") if all(s in kept[d] for s in HARBOUR)]
    assert len(with_span) == 1, with_span
    cut = "doc_b" if with_span == ["doc_a"] else "doc_a"
    key = cut.removeprefix("doc_")
    assert not any(s in kept[cut] for s in HARBOUR)
    assert kept[cut] == text(OWN[key], OWN[f"{key}_end"])  # the rest of the document is kept as it was


def test_documents_sharing_only_two_sentences_are_untouched(deduped):
    _, kept, _ = deduped
    assert kept["doc_c"] == text(OWN["c"], PAIR, OWN["c_end"])
    assert kept["doc_d"] == text(OWN["d"], PAIR, OWN["d_end"])
    assert kept["doc_f"] == text(OWN["f"], ORCHARD, OWN["f_end"])  # the first copy of the other span


def test_a_document_left_too_short_is_dropped_and_counted(deduped):
    result, kept, out = deduped
    assert set(kept) == {"doc_a", "doc_b", "doc_c", "doc_d", "doc_f"}
    step = result.counts["steps"]["sentence_dedup/sentence_dedup"]
    assert (step["in"], step["kept"], step["dropped"]) == (6, 5, 1)
    assert step["dropped_by_reason"] == {"too_short_after_span_dedup": 1}
    n_chars = sum(len(s) for s in HARBOUR + ORCHARD)
    assert step["removed"]["spans"] == 2 and step["removed"]["sentences"] == 6
    assert n_chars <= step["removed"]["chars"] <= n_chars + 6  # the spans plus the spaces between sentences
    for key, c in result.counts["steps"].items():
        if "in" in c:
            assert c["in"] == c["kept"] + c["dropped"] == c["kept"] + sum(c["dropped_by_reason"].values()), key
    # The audit copy marks what was cut: the dropped document and the one that lost its span.
    audit = []
    for path in sorted((out / "removed" / "sentence_dedup").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            audit += [json.loads(line) for line in f]
    cut = {d for d in ("doc_a", "doc_b") if HARBOUR[0] not in kept[d]}
    assert {r["id"] for r in audit} == {"doc_e", *cut}
    assert all(">>>" in r["text"] and "<<<" in r["text"] for r in audit)


def test_switch_off_removes_the_stages(tmp_path):
    from tasks.data.inputs import sized_inputs
    from tasks.data.plan import plan_runs

    def names(cfg: DataConfig) -> list[str]:
        return [run.name for run in plan_runs(cfg, sized_inputs(cfg), tmp_path)]

    assert names(DataConfig())[-4:] == ["minhash_dedup", "sentence_signatures", "sentence_find", "sentence_dedup"]
    assert not any(n.startswith("sentence") for n in names(DataConfig(sentence_dedup=False)))
