"""Decontamination: benchmark items planted in real training text are found (and nothing else is), the short-item
rule, clean-subset scores, the report ref, and the data stage's optional removal counted in its funnel.

Run: `.venv/bin/python -m pytest tests/unit/test_decontam.py -x -q` (about 15 s on 2 cores, most of it the one
data-stage run).
"""

import gzip
import json
from pathlib import Path

import pytest

from infra.env import setup_env

setup_env()  # offline switches before datatrove / datasets are imported

from eval.benchmarks import TASKS  # noqa: E402
from eval.decontam import BenchmarkIndex, ContaminationError, clean_scores, item_segments, words  # noqa: E402
from infra.jsonl import read_jsonl  # noqa: E402
from tasks.conversations import SFTSource  # noqa: E402
from tasks.data import DataConfig, build_corpus, crawl_inputs, iter_records  # noqa: E402
from tasks.decontam import DecontamConfig, check_contamination  # noqa: E402
from tasks.refs import CorpusRef, load_ref  # noqa: E402

BENCH = Path("data/benchmarks")
HS_DOC, ARC_DOC = 7, 7  # the planted items: a HellaSwag context + gold ending, an ARC-Easy question + answer


def record(task: str, doc_id: int) -> dict:
    return list(read_jsonl(BENCH / f"{task}.jsonl.gz"))[doc_id]


def hellaswag_context_and_gold(doc_id: int) -> tuple[str, str]:
    """Our older layout (query, choices, gold) or the Hugging Face one (activity_label, ctx, endings, label)."""
    r = record("hellaswag", doc_id)
    if "query" in r:
        return r["query"], r["choices"][r["gold"]]
    return f"{r['activity_label']}: {r['ctx']}", r["endings"][int(r["label"])]


def hellaswag_text(doc_id: int) -> str:
    return " ".join(hellaswag_context_and_gold(doc_id))


def arc_text(doc_id: int) -> str:
    r = record("arc_easy", doc_id)
    return f"{r['question']} {r['choices']['text'][r['choices']['label'].index(r['answerKey'])]}"


def write_jsonl_gz(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def c4_docs(k: int) -> list[str]:
    return [r["text"] for _, r in zip(range(k), read_jsonl("data/text/c4_demo.jsonl.gz"), strict=False)]


# ---------------------------------------------------------------------------------------------------------------
# the stage core on real benchmark files and real training text


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A corpus of 50 real C4 documents, one of which quotes a HellaSwag item (case and punctuation changed), and an
    SFT file of real Alpaca records, one of whose answers quotes an ARC-Easy item."""
    tmp = tmp_path_factory.mktemp("planted")
    docs = c4_docs(50)
    docs[17] = f"{docs[17]}\n\nFrom a video caption: {hellaswag_text(HS_DOC).upper().replace('.', ';')} Then it ended."
    write_jsonl_gz(tmp / "documents" / "00000.jsonl.gz", [{"text": t, "id": f"c4/{i}"} for i, t in enumerate(docs)])
    with gzip.open("data/sft/alpaca_en_demo.json.gz", "rt") as f:
        alpaca = json.load(f)[:40]
    alpaca[3] = {"instruction": "Answer the quiz question.", "input": "", "output": f"Quiz: {arc_text(ARC_DOC)}."}
    (tmp / "alpaca.json").write_text(json.dumps(alpaca))
    cfg = DecontamConfig(data_dir=str(BENCH))
    ref = check_contamination(cfg, CorpusRef(path=str(tmp / "documents")), [SFTSource(path=str(tmp / "alpaca.json"))],
                              [], tmp / "out")
    return ref, tmp


def test_planted_items_are_found_and_nothing_else(planted):
    ref, _ = planted
    assert ref.contaminated() == {t: {"hellaswag": [HS_DOC], "arc_easy": [ARC_DOC]}.get(t, []) for t in TASKS}
    report = ref.report()
    hs, arc = report["tasks"]["hellaswag"]["examples"][0], report["tasks"]["arc_easy"]["examples"][0]
    assert (hs["source"], hs["training_doc"]) == ("corpus", "c4/17")
    assert (arc["source"], arc["training_doc"]) == ("sft_alpaca", "3")
    assert len(hs["ngram"].split()) == 13 and hs["ngram"] in " ".join(words(hellaswag_text(HS_DOC)))
    assert report["sources"] == {"corpus": 50, "sft_alpaca": 40}


def test_fractions_and_report_files(planted):
    ref, _ = planted
    items = {t: sum(1 for _ in read_jsonl(BENCH / f"{t}.jsonl.gz")) for t in TASKS}
    assert ref.fractions() == {t: (1 / items[t] if t in ("hellaswag", "arc_easy") else 0.0) for t in TASKS}
    assert ref.metrics["decontam/hellaswag/fraction"] == 1 / 200 and ref.counts["contaminated_arc_easy"] == 1
    table = ref.file("table").read_text()
    assert "| hellaswag | 200 | 1 | 0.0050 |" in table and "| piqa | 200 | 0 | 0.0000 |" in table
    assert load_ref({"type": "ContaminationReport", **ref.model_dump(exclude={"cached"})}) == ref


def test_a_paraphrase_is_not_contamination(tmp_path):
    """Every word of the item, but never 13 of them in a row: clean."""
    index = BenchmarkIndex.build(BENCH, ["hellaswag"])
    ws = words(hellaswag_text(HS_DOC))
    shuffled = " ".join(ws[i] for i in [*range(0, len(ws), 2), *range(1, len(ws), 2)])
    assert index.find(shuffled) == []
    assert [(m.task, m.doc_id) for m in index.find(" ".join(ws))] == [("hellaswag", HS_DOC)]


def test_overlapping_hellaswag_items_are_both_contaminated():
    """HellaSwag items cut from one video overlap: item 4's gold ending is a sentence of item 5's context, so a
    document holding item 5 holds a 13-gram of item 4's gold segment too (as GPT-3's rule says it should)."""
    (_, four_gold), (five_context, _) = hellaswag_context_and_gold(4), hellaswag_context_and_gold(5)
    assert four_gold == "gets up from the mat." and "The boy gets up from the mat." in five_context
    index = BenchmarkIndex.build(BENCH, ["hellaswag"])
    assert sorted(m.doc_id for m in index.find(hellaswag_text(5))) == [4, 5]


# ---------------------------------------------------------------------------------------------------------------
# the item rule


def test_short_segments_are_one_ngram_and_very_short_ones_never_match(tmp_path):
    # ARC layout; segment = question + " " + choice. Record 0: 10 words (one 10-gram). Record 1: 5 words (< 8).
    recs = [{"question": "Which gas do green plants take in from the", "choices": {"text": ["air?"], "label": ["A"]},
             "answerKey": "A"},
            {"question": "Is ice cold?", "choices": {"text": ["Yes, always."], "label": ["A"]}, "answerKey": "A"}]
    write_jsonl_gz(tmp_path / "arc_easy.jsonl.gz", recs)
    index = BenchmarkIndex.build(tmp_path, ["arc_easy"])
    assert index.lengths == [10] and index.too_short == {"arc_easy": 1}
    text = "Teacher: which GAS do green plants take in, from the air? Oxygen is wrong. Is ice cold? Yes, always."
    assert [(m.doc_id, m.ngram) for m in index.find(text)] == [(0, "which gas do green plants take in from the air")]
    assert index.find("which gas do green plants take in from the sea") == []  # 9 of the 10 words: not enough


def test_both_record_layouts_give_the_same_words():
    """HellaSwag and WinoGrande in our current layout and in the Hugging Face one (which another change moves to)."""
    endings = ["starts doing spins.", "celebrates by clapping and flexing both arms.", "is dancing on the mat.",
               "does jump jacks on his stick."]
    hf = {"activity_label": "High jump", "ctx_a": "The boy lands on his back on to a red mat. The boy gets up from the mat.",
          "ctx_b": "the boy", "endings": endings, "label": "1"}
    ours = {"query": "High jump: The boy lands on his back on to a red mat. The boy gets up from the mat. The boy",
            "choices": endings, "gold": 1}
    new, old = item_segments("hellaswag", hf, "x"), item_segments("hellaswag", ours, "y")
    assert [words(s) for s in old] == [words(s) for s in new] and len(new) == 4
    hf = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
          "option1": "Sarah", "option2": "Maria", "answer": "2"}
    ours = {"context_options": ["Sarah was a much better surgeon than Maria so Sarah",
                                "Sarah was a much better surgeon than Maria so Maria"],
            "continuation": "always got the easier cases.", "gold": 1}
    new, old = item_segments("winogrande", hf, "x"), item_segments("winogrande", ours, "y")
    assert [words(s) for s in old] == [words(s) for s in new] and len(new) == 2


def test_words_are_datatroves_simplify_text():
    """Our faster path gives the words of datatrove's own `simplify_text`, on real text and on accents and digits."""
    from datatrove.utils.text import simplify_text

    texts = [*c4_docs(20), "Café au lait, naïve résumé: 3.14 apples cost €2,50 on Monday.\n\tÅngström — done."]
    assert [words(t) for t in texts] == [simplify_text(t).split() for t in texts]


def test_bad_benchmark_input_is_one_line_naming_file_record_and_task(tmp_path):
    write_jsonl_gz(tmp_path / "piqa.jsonl.gz", [{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}, {"goal": "a"}])
    with pytest.raises(ContaminationError, match=r"piqa.jsonl.gz record 1: task 'piqa' record in no known layout \(missing 'sol1'\)"):
        BenchmarkIndex.build(tmp_path, ["piqa"])
    with pytest.raises(ContaminationError, match="unknown benchmark task.*'mmlu'"):
        BenchmarkIndex.build(tmp_path, ["mmlu"])
    with pytest.raises(ContaminationError, match="boolq.jsonl.gz: benchmark file of task 'boolq' not found"):
        BenchmarkIndex.build(tmp_path, ["boolq"])
    with pytest.raises(ValueError, match="unknown benchmark task.*'hellaswag_v2'"):
        DecontamConfig(tasks=["hellaswag_v2"])
    with pytest.raises(ValueError, match=r"min_words \(14\) must be at most n \(13\)"):
        DecontamConfig(min_words=14)


# ---------------------------------------------------------------------------------------------------------------
# scores on the clean subset


def test_clean_scores_are_the_mean_over_clean_documents(tmp_path):
    rows = {"arc_easy": [(0, 1.0, 1.0), (1, 0.0, 1.0), (2, 1.0, 0.0), (3, 0.0, 0.0), (4, 1.0, 1.0)],
            "lambada_openai": [(0, 1.0, None), (1, 0.0, None), (2, 0.0, None)]}
    for task, docs in rows.items():
        lines = []
        for doc_id, acc, acc_norm in docs:
            metrics = {"acc": acc, "perplexity": -2.5} if acc_norm is None else {"acc": acc, "acc_norm": acc_norm}
            lines.append(json.dumps({"doc_id": doc_id, "metrics": metrics, "loglikelihoods": [-1.0], "target": 0}))
        (tmp_path / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    scores = clean_scores(tmp_path, {"arc_easy": [1, 4], "lambada_openai": [0]})
    # arc_easy clean docs 0, 2, 3: acc (1 + 1 + 0) / 3, acc_norm (1 + 0 + 0) / 3; lambada clean 1, 2: acc 0 / 2
    assert scores == {"arc_easy": {"acc": 2 / 3, "acc_norm": 1 / 3, "n": 3}, "lambada_openai": {"acc": 0.0, "n": 2}}
    with pytest.raises(ContaminationError, match="piqa.jsonl: no per-sample file for task 'piqa'"):
        clean_scores(tmp_path, {"piqa": []})


# ---------------------------------------------------------------------------------------------------------------
# the data stage removes contaminated documents


def test_data_stage_decontaminate_drops_the_planted_document(tmp_path):
    docs = c4_docs(12)
    docs[4] = f"{docs[4]} {arc_text(ARC_DOC)} That is what the textbook said."
    source = write_jsonl_gz(tmp_path / "text.jsonl.gz", [{"text": t, "id": f"doc{i}"} for i, t in enumerate(docs)])
    off = dict(gopher_repetition=False, gopher_quality=False, c4_quality=False, c4_badwords=False, pii=False,
               exact_dedup=False, minhash=False, sentence_dedup=False, tasks=1, workers=1)
    cfg = DataConfig(inputs=[], text_sources={str(source): 1.0}, decontaminate=True, **off)
    ref = build_corpus(cfg, crawl_inputs(cfg), tmp_path / "out")
    step = ref.counts["steps"]["filter/decontaminate"]
    assert step["dropped_by_reason"] == {"decontaminated": 1} and step["in"] == step["kept"] + 1
    assert step["stats"]["contaminated_arc_easy"] == 1
    kept = {r["id"] for r in iter_records(tmp_path / "out" / "documents")}
    assert "doc4" not in kept and len(kept) == step["kept"]
    [removed] = list(iter_records(tmp_path / "out" / "removed" / "decontaminate"))
    assert removed["id"] == "doc4" and removed["metadata"]["contaminated_doc_id"] == ARC_DOC
