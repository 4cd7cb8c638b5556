"""Tests for eval/: data preparation, the local lm-eval tasks, the "gptflow" LM adapter and run_benchmarks.

Everything runs offline on CPU with a tiny random GPT and a tiny BPE tokenizer trained here on the bundled
benchmark text. The full-size shared data (../shared/data, or $GPTFLOW_SHARED_DATA) is only used by the tests
that say so, and they are skipped when it is absent.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from fitting import fit_rows
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from eval import convert, prepare
from eval.benchmarks import TASKS, data_file
from eval.harness import plot_results, run_benchmarks
from eval.lm import GPTFlowLM
from eval.taskgen import write_task_configs
from models.checkpoint import save_model
from models.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "data" / "benchmarks"
SHARED = Path(os.environ.get("GPTFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))
HAVE_SHARED = all(
    (SHARED / sub / name).is_file()
    for sub, name in [("benchmarks", "arc_easy.jsonl.gz"), ("pretrain", prepare.SOURCE_FILES["wikitext"])]
)

EXPECTED_METRICS = {
    "hellaswag": {"acc", "acc_norm"},
    "arc_easy": {"acc", "acc_norm"},
    "arc_challenge": {"acc", "acc_norm"},
    "piqa": {"acc", "acc_norm"},
    "winogrande": {"acc"},
    "boolq": {"acc"},
    "openbookqa": {"acc", "acc_norm"},
    "lambada_openai": {"perplexity", "acc"},
    "wikitext": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
}
FULL_COUNTS = {  # lm-eval's eval split sizes
    "hellaswag": 10042,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "piqa": 1838,
    "winogrande": 1267,
    "boolq": 3270,
    "openbookqa": 500,
    "lambada_openai": 5153,
    "wikitext": 62,
}
BLOCK = 64


# ----------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny matmuls on a shared 2-core box run faster (and steadier) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    texts = [d["page"] for d in _read(BUNDLE / "wikitext.jsonl.gz")]
    texts += [d["ctx"] + " " + " ".join(d["endings"]) for d in _read(BUNDLE / "hellaswag.jsonl.gz")]
    texts += [d["question"] + " " + " ".join(d["choices"]["text"]) for d in _read(BUNDLE / "arc_easy.jsonl.gz")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _tiny_gpt(vocab: int, n_embd: int = 32, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=BLOCK, n_layer=2, n_head=2, n_embd=n_embd)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_path) -> Path:
    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    return save_model(_tiny_gpt(vocab), tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def lm(model_dir, tokenizer_path) -> GPTFlowLM:
    return GPTFlowLM.create_from_arg_string(f"model_dir={model_dir},tokenizer={tokenizer_path},batch_size=3")


def _load_tasks(data_dir: Path, out_dir: Path, names: list[str], limit: int):
    """lm-eval Task objects for our YAMLs, with their requests built (first `limit` docs)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=str(write_task_configs(data_dir, out_dir)), include_defaults=False)
    tasks = get_task_dict([f"gptflow_{n}" for n in names], tm)
    for task in tasks.values():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
    return {name[len("gptflow_") :]: task for name, task in tasks.items()}


def _requests_by_doc(task) -> dict[int, list]:
    out: dict[int, list] = {}
    for inst in task.instances:
        out.setdefault(inst.doc_id, []).append(inst)
    for insts in out.values():
        insts.sort(key=lambda i: i.idx)
    return out


# ----------------------------------------------------------------------------------------------------------
# run_benchmarks end to end


def test_run_benchmarks_all_tasks_offline(model_dir, tokenizer_path, tmp_path):
    out = tmp_path / "run"
    summary = run_benchmarks(model_dir, tokenizer_path, ["core"], 5, BUNDLE, out, batch_size=8)

    results = summary["results"]
    assert set(results) == set(EXPECTED_METRICS) | {"core"}
    for task, metrics in EXPECTED_METRICS.items():
        assert set(results[task]) == metrics, task
        for name, value in results[task].items():
            assert math.isfinite(value), (task, name, value)
            if name.startswith("acc"):
                assert 0.0 <= value <= 1.0
            else:
                assert value > 0.0
        assert summary["samples_count"][task]["effective"] == 5
    assert 0.0 <= results["core"]["acc"] <= 1.0
    assert summary["samples_count"]["hellaswag"]["original"] == 200  # the bundle holds 200 items per task

    saved = json.loads((out / "results.json").read_text())
    assert saved["results"] == results
    table = (out / "results.md").read_text()
    assert "| task | metric | value | stderr |" in table
    assert "| wikitext | bits_per_byte |" in table and "| lambada_openai | perplexity |" in table
    assert summary["table_md"] in table

    png = plot_results(summary, out / "results.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _train_on(model: GPT, lm: GPTFlowLM, pairs: list[tuple[str, str]], steps: int = 300) -> float:
    """Fit the model to the exact (context, continuation) windows lm-eval will score; returns the last loss."""
    rows = []
    for ctx, cont in pairs:
        c, k = lm.encode_pair(ctx, cont)
        rows.append((c + k)[-(BLOCK + 1) :])
    return fit_rows(model, rows, steps, stop_below=0.05)


def test_gold_preferring_model_scores_one(tokenizer_path, model_dir, tmp_path):
    """A real GPT fitted to the gold answers gets acc 1.0; fitted to a wrong answer, 0.0 (through lm-eval)."""
    tasks = _load_tasks(BUNDLE, tmp_path / "yaml", ["arc_easy", "openbookqa", "lambada_openai"], limit=3)
    model = _tiny_gpt(Tokenizer.from_file(str(tokenizer_path)).get_vocab_size(), n_embd=64, seed=1)
    lm = GPTFlowLM(model=model, tokenizer=str(tokenizer_path))
    pairs = []
    for name, pick in (("arc_easy", 0), ("openbookqa", 1)):  # 0: the gold choice; 1: the next (wrong) one
        for insts in _requests_by_doc(tasks[name]).values():
            doc = insts[0].doc
            gold = doc["choices"]["label"].index(doc["answerKey"])
            pairs.append(insts[(gold + pick) % len(insts)].args)
    pairs += [insts[0].args for insts in _requests_by_doc(tasks["lambada_openai"]).values()]
    assert len(pairs) == 9
    assert _train_on(model, lm, pairs) < 0.05

    summary = run_benchmarks(
        model_dir,
        tokenizer_path,
        ["arc_easy", "openbookqa", "lambada_openai"],
        3,
        BUNDLE,
        tmp_path / "run",
        model=model,
    )
    res = summary["results"]
    assert res["arc_easy"] == {"acc": 1.0, "acc_norm": 1.0}
    assert res["openbookqa"] == {"acc": 0.0, "acc_norm": 0.0}
    assert res["lambada_openai"]["acc"] == 1.0  # the last word is the greedy continuation
    assert 1.0 <= res["lambada_openai"]["perplexity"] < 1.5


# ----------------------------------------------------------------------------------------------------------
# conversion of known source records


def test_converters_on_known_records():
    rec = {
        "choices": [
            "Planetary density will decrease.",
            "Planetary years will become longer.",
            "Planetary days will become shorter.",
            "Planetary gravity will become stronger.",
        ],
        "query": "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?",
        "gold": 2,
    }
    arc = convert.convert_arc(rec, 0, prefix="arc_challenge")
    assert arc["question"].startswith("An astronomer observes") and arc["answerKey"] == "C"
    assert arc["choices"] == {"text": rec["choices"], "label": ["A", "B", "C", "D"]}

    piqa = convert.convert_piqa({"choices": ["a b", "c d"], "gold": 1, "query": "Question: dresser\n"})
    assert piqa == {"goal": "dresser", "sol1": "a b", "sol2": "c d", "label": 1}

    boolq = convert.convert_boolq(
        {"query": "Passage: Some text.\nQuestion: is it true?", "choices": ["no", "yes"], "gold": 1}
    )
    assert boolq == {"passage": "Some text.", "question": "is it true", "label": 1}

    lam = convert.convert_lambada({"context": "and saw the", "continuation": "\n\nrecorder"})
    assert lam["text"].split(" ")[-1] == "\n\nrecorder" and " ".join(lam["text"].split(" ")[:-1]) == "and saw the"

    hs = convert.convert_hellaswag_item(
        [
            "Sharpening knives: A man is holding a pocket knife while sitting on some rocks in the wilderness. then he",
            "1",
            "opens a can.",
            "takes a small stone.",
            "uses the knife.",
            "sand the rocks.",
        ]
    )
    assert hs["ctx_a"].endswith("in the wilderness.") and hs["ctx_b"] == "then he" and hs["label"] == "1"
    wikihow = "How to use aromatherapy for depression. Know what oils help with which symptoms."
    assert convert.split_hellaswag_context(wikihow) == (wikihow, "")  # WikiHow: ctx_b empty
    assert convert.split_hellaswag_context("no sentence end here") == ("", "no sentence end here")

    raw = " = A = \r\n Text one . \r\n = = Sec = = \r\n More . \r\n = B = \r\n Two . \r\n"
    assert convert.wikitext_pages(raw) == [" = A = \n Text one . \n = = Sec = = \n More . ", " = B = \n Two . \n"]

    with pytest.raises(convert.BenchmarkDataError, match="gold"):
        convert.convert_openbookqa({"query": "q", "choices": ["a", "b"], "gold": 5}, 0)


def test_bundle_records_are_the_hf_records():
    """The first bundled HellaSwag and WinoGrande items, converted from the shared files, equal the records of
    the HF datasets lm-eval reads (Rowan/hellaswag validation, winogrande_xl validation; HF's ids aside)."""
    hs = _read(BUNDLE / "hellaswag.jsonl.gz")[0]
    assert {k: hs[k] for k in ("activity_label", "ctx_a", "ctx_b", "label")} == {
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "label": "3",
    }
    assert hs["endings"][3] == "starts pulling up roofing on a roof."
    wg = _read(BUNDLE / "winogrande.jsonl.gz")[0]
    assert wg == {
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "2",
    }


@pytest.mark.parametrize(
    ("options", "continuation", "sentence", "option1", "option2"),
    [
        (
            ["He hid from the dog but the dog", "He hid from the dog but the cat"],
            "won.",
            "He hid from the dog but the _ won.",
            "dog",
            "cat",
        ),
        (
            ["The blanket", "The bed"],
            "got wet.",
            "The _ got wet.",
            "blanket",
            "bed",
        ),  # shared "The " goes to the sentence
        (["so the blanket", "so the bed"], "'s wet.", "so the _'s wet.", "blanket", "bed"),  # no space before "'s"
        (["Ann", "Annie"], "left.", "_ left.", "Ann", "Annie"),  # one option is a prefix of the other
    ],
)
def test_winogrande_sentence_rebuilt_so_lm_eval_makes_the_same_requests(
    options, continuation, sentence, option1, option2
):
    """Rule: the blank sits at the two contexts' common prefix cut back to a word start (`winogrande_blank`)."""
    from lm_eval.tasks.winogrande import preprocess_winogrande as lm

    rec = convert.convert_winogrande({"context_options": options, "continuation": continuation, "gold": 1})
    assert rec == {"sentence": sentence, "option1": option1, "option2": option2, "answer": "2"}
    assert lm.doc_to_choice(rec) == options and lm.doc_to_target(rec) == continuation and lm.doc_to_text(rec) == 1
    with pytest.raises(convert.BenchmarkDataError, match="blank"):
        convert.convert_winogrande({"context_options": ["a_b x", "a_b y"], "continuation": "z", "gold": 0})


def _write_gz(path: Path, text: str, kind: str = "gz") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    if kind == "bz2":
        import bz2

        path.write_bytes(bz2.compress(data))
    else:
        path.write_bytes(gzip.compress(data))


def _synthetic_sources(src: Path, n: int = 7) -> None:
    def mc(i):
        return {"query": f"Question: q{i}?", "choices": ["a", "b", "c", "d"], "gold": i % 4}

    lines = {
        "arc_easy.jsonl.gz": [mc(i) for i in range(n)],
        "arc_challenge.jsonl.gz": [mc(i) for i in range(n + 1)],
        "openbook_qa.jsonl.gz": [{**mc(i), "query": f"stem {i}"} for i in range(n + 2)],
        "piqa.jsonl.gz": [{"query": f"Question: goal {i}\n", "choices": ["x", "y"], "gold": i % 2} for i in range(n)],
        "boolq.jsonl.gz": [
            {"query": f"Passage: p{i}\nQuestion: q{i}?", "choices": ["no", "yes"], "gold": i % 2} for i in range(n)
        ],
        "winogrande.jsonl.gz": [
            {"context_options": [f"A {i} B", f"A {i} C"], "continuation": "went home.", "gold": i % 2} for i in range(n)
        ],
        "lambada_openai.jsonl.gz": [{"context": f"story {i} about", "continuation": "cats"} for i in range(n)],
    }
    for name, recs in lines.items():
        _write_gz(src / "benchmarks" / name, "".join(json.dumps(r) + "\n" for r in recs))
    hs = "".join(f"Label: ctx {i}. the man\n{i % 4}\ne0\ne1\ne2\ne3\n" for i in range(n + 3))
    _write_gz(src / "benchmarks" / prepare.SOURCE_FILES["hellaswag"], hs, kind="bz2")
    wiki = "".join(f" = Article {i} = \r\n Body {i} . \r\n = = Section = = \r\n More . \r\n" for i in range(4))
    _write_gz(src / "pretrain" / prepare.SOURCE_FILES["wikitext"], wiki)


def test_prepare_counts_equal_source_counts(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _synthetic_sources(src)
    manifest = prepare.prepare_benchmarks(src, out)
    assert set(manifest) == set(TASKS)
    for task in TASKS:
        path = data_file(out, task)
        expected = prepare.source_count(task, prepare.find_source(src, task))
        assert prepare.count_jsonl_gz(path) == manifest[task]["count"] == expected, task
    assert manifest["hellaswag"]["count"] == 10 and manifest["wikitext"]["count"] == 4
    assert {k: _read(out / "hellaswag.jsonl.gz")[0][k] for k in ("activity_label", "ctx_a", "ctx_b")} == {
        "activity_label": "Label",
        "ctx_a": "ctx 0.",
        "ctx_b": "the man",
    }

    limited = prepare.prepare_benchmarks(src, tmp_path / "lim", limit=3, wikitext_limit=2)
    assert {t: m["count"] for t, m in limited.items()} == {**{t: 3 for t in TASKS}, "wikitext": 2}


@pytest.mark.skipif(not HAVE_SHARED, reason="full benchmark sources (../shared/data) not available")
def test_prepare_full_shared_sets(tmp_path):
    """Full conversion keeps every item; the repo bundle is exactly the same command with limits."""
    manifest = prepare.prepare_benchmarks(SHARED, tmp_path / "full")
    assert {t: m["count"] for t, m in manifest.items()} == FULL_COUNTS
    for task in TASKS:
        bundled = _read(BUNDLE / f"{task}.jsonl.gz")
        assert _read(tmp_path / "full" / f"{task}.jsonl.gz")[: len(bundled)] == bundled, f"bundle out of date: {task}"


def test_bundle_is_small_and_complete():
    files = [BUNDLE / f"{t}.jsonl.gz" for t in TASKS]
    assert sum(f.stat().st_size for f in files) < 1_500_000
    counts = {t: prepare.count_jsonl_gz(f) for t, f in zip(TASKS, files, strict=True)}
    assert counts == {**{t: 200 for t in TASKS}, "wikitext": 5}


# ----------------------------------------------------------------------------------------------------------
# errors


def test_missing_data_file_names_the_file(model_dir, tokenizer_path, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(FileNotFoundError, match=r"piqa\.jsonl\.gz"):
        run_benchmarks(model_dir, tokenizer_path, ["piqa"], 2, data, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"tokenizer file not found: .*nope\.json"):
        GPTFlowLM(model_dir=model_dir, tokenizer=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="unknown task"):
        run_benchmarks(model_dir, tokenizer_path, ["mmlu"], 2, BUNDLE, tmp_path / "out")


def test_prepare_missing_source_names_the_file(tmp_path, capsys):
    src = tmp_path / "src"
    _synthetic_sources(src)
    (src / "benchmarks" / "piqa.jsonl.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"piqa\.jsonl\.gz"):
        prepare.prepare_benchmarks(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written
    assert prepare.main(["--src", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "piqa.jsonl.gz" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# the LM adapter itself


def _manual_logprob(model: GPT, tokens: list[int], n_pred: int) -> tuple[float, bool]:
    """Reference: one forward over the (left-truncated) sequence, as lm-eval's HFLM does."""
    inp = tokens[-(BLOCK + 1) :][:-1]
    with torch.no_grad():
        logits, _ = model(torch.tensor([inp]))
    logp = torch.log_softmax(logits[0, -n_pred:].float(), dim=-1)
    tgt = torch.tensor(tokens[-n_pred:])
    return logp.gather(1, tgt[:, None]).sum().item(), bool((logp.argmax(-1) == tgt).all())


def test_registered_and_created_from_arg_string(lm, model_dir, tokenizer_path):
    from lm_eval.api.registry import get_model

    assert get_model("gptflow") is GPTFlowLM
    assert lm.batch_size == 3 and lm.max_length == BLOCK
    assert lm.eot_token_id == lm.tokenizer.token_to_id("<|endoftext|>")
    # what simple_evaluate(model="gptflow", model_args=..., batch_size=8, device="cpu") does
    lm2 = get_model("gptflow").create_from_arg_string(
        f"model_dir={model_dir},tokenizer={tokenizer_path},batch_size=4",
        {"batch_size": 8, "max_batch_size": None, "device": "cpu"},
    )
    assert lm2.batch_size == 4


def test_eval_package_does_not_import_orchestration():
    import ast

    roots = set()
    for path in (REPO / "eval").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
    assert not roots & {"prefect", "mlflow", "ray"}


def test_loglikelihood_matches_reference_and_greedy(lm):
    from lm_eval.api.instance import Instance

    def req(*args):
        return Instance("loglikelihood", {}, args, 0)

    ctx = "The man is sitting on a roof. He"
    ctx_tok = lm.tok_encode(ctx)
    with torch.no_grad():
        logits, _ = lm.model(torch.tensor([ctx_tok]))
    best, worst = int(logits[0, -1].argmax()), int(logits[0, -1].argmin())
    assert lm._score([(ctx_tok + [best], 1)])[0][1] is True
    assert lm._score([(ctx_tok + [worst], 1)])[0][1] is False

    long_ctx = " ".join(["the cat sat on the mat ."] * 30)  # longer than the block: truncated from the left
    reqs = [req(ctx, " starts pulling up roofing."), req(ctx + " ", "is ripping tiles off."), req(long_ctx, " dog")]
    got = lm.loglikelihood(reqs)
    for r, (ll, greedy) in zip(reqs, got, strict=True):
        c, k = lm.encode_pair(*r.args)
        ref_ll, ref_greedy = _manual_logprob(lm.model, c + k, len(k))
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy
    # trailing whitespace of the context moves into the continuation, as in lm-eval
    assert lm.encode_pair(ctx + " ", "is") == lm.encode_pair(ctx, " is")
    # empty context: the end-of-text token is the prefix, same as the rolling log-likelihood
    ((ll_empty, _),) = lm.loglikelihood([req("", "Robert Boulter is an actor.")])
    roll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Robert Boulter is an actor.",), 0)])
    assert ll_empty == pytest.approx(roll[0], abs=1e-4)


def test_loglikelihood_rolling_matches_lm_eval_windows(lm):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = " = Robert Boulter = \n" + " ".join(
        ["Robert Boulter is an English film , television and theatre actor ."] * 12
    )
    tokens = lm.tok_encode(text)
    assert len(tokens) > 3 * BLOCK
    ref = 0.0
    for window in get_rolling_token_windows(tokens, lm.eot_token_id, BLOCK, 1):
        inp, pred = make_disjoint_window(window)
        ref += _manual_logprob(lm.model, inp + pred, len(pred))[0]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert got[0] == pytest.approx(ref, rel=1e-5)


def test_generate_until_respects_stop_and_length(lm):
    from lm_eval.api.instance import Instance

    def gen(**kw):
        return lm.generate_until([Instance("generate_until", {}, ("The man is sitting on a", kw), 0)])[0]

    free = gen(until=["<never>"], max_gen_toks=12)
    assert 0 < len(lm.tok_encode(free)) <= 12 or free == ""
    assert len(lm.tok_encode(gen(until=["<never>"], max_gen_toks=3))) <= 3
    if len(free) >= 4:
        stop = free[2:4]
        assert gen(until=[stop], max_gen_toks=12) == free[: free.find(stop)]


def test_evaluate_model_reports_scores_and_files(model_dir, tokenizer_path, tmp_path):
    from tasks.evaluate import EvalConfig, evaluate_model
    from tasks.refs import ModelRef, ShardsRef, TokenizerRef

    cfg = EvalConfig(tasks=["arc_easy", "wikitext"], limit=2, data_dir=str(BUNDLE), batch_size=4)
    tok = TokenizerRef(path=str(tokenizer_path.parent), shards=ShardsRef(path=str(tmp_path)))
    report = evaluate_model(cfg, ModelRef(path=str(model_dir)), tok, tmp_path / "eval")
    assert report.path == str(tmp_path / "eval" / "results.json")
    assert set(report.files) == {"results", "table", "plot", "samples"}
    assert all(report.file(f).is_file() for f in ("results", "table", "plot"))
    assert sorted(p.name for p in report.file("samples").iterdir()) == ["arc_easy.jsonl", "wikitext.jsonl"]
    assert report.artifacts == ["table", "results", "plot", "samples"] and report.table.startswith("# Benchmarks")
    results = json.loads(report.file("results").read_text())["results"]
    assert report.scores() == {f"{t}/{m}": v for t, ms in results.items() for m, v in ms.items()}
    assert report.counts["tasks"] == 2 and report.counts["docs_arc_easy"]["effective"] == 2


def test_compare_reports_puts_each_model_in_a_column_and_bolds_the_best_of_each_row():
    from tasks.evaluate import compare_reports
    from tasks.refs import EvalReport

    reports = {
        "sft": EvalReport(
            path="a",
            metrics={
                "eval/arc_easy/acc": 0.30,
                "eval/wikitext/word_perplexity": 900.0,
                "eval/arc_easy/acc_stderr": 0.01,
                "eval/piqa/acc": 0.5,
            },
        ),
        "dpo": EvalReport(
            path="b", metrics={"eval/arc_easy/acc": 0.25, "eval/wikitext/word_perplexity": 800.0, "eval/piqa/acc": 0.5}
        ),
        "ppo": EvalReport(path="c", metrics={"eval/arc_easy/acc": 0.28, "eval/piqa/acc": 0.5}),
    }
    lines = compare_reports(reports).splitlines()
    assert lines[0] == "| benchmark | sft | dpo | ppo |"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]] for line in lines[2:]}
    assert set(rows) == {"arc_easy/acc", "wikitext/word_perplexity", "piqa/acc"}  # standard errors left out
    assert rows["arc_easy/acc"] == ["**0.3000**", "0.2500", "0.2800"]  # higher is better
    assert rows["wikitext/word_perplexity"] == ["900.0000", "**800.0000**", ""]  # lower is better; a missing cell
    assert rows["piqa/acc"] == ["0.5000"] * 3  # a tie of every model: nothing is best
