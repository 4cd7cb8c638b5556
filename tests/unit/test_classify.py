"""GPT-1 style task fine-tuning (`tasks/classify.py`, `models/classifier.py`) on the bundled BoolQ records with a
tiny model: the input format, the head lowering held-out loss, the LM term, bad records, and the stage through
`classify_task.fn` against a throwaway sqlite MLflow (its metrics, its registered, loadable model).

Run: `.venv/bin/python -m pytest tests/unit/test_classify.py -q`.
"""

from __future__ import annotations

import json
import re

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from infra.env import DATA_DIR
from infra.jsonl import read_jsonl
from models.checkpoint import save_model
from models.classifier import GPTClassifier, load_classifier, save_classifier
from models.gpt import GPT, GPTConfig
from models.tokens import END, EOT, PAD, role_token
from tasks.bpe import save_tokenizer, train_bpe
from tasks.classify import ClassifyConfig, encode, finetune_classifier, make_batch, read_boolq
from tasks.refs import ModelRef, ShardsRef, TokenizerRef
from tasks.stage import GptflowError
from tasks.tokenizer import TokenizerConfig
from tasks.tracking import EXPERIMENT

pytestmark = pytest.mark.usefixtures("one_thread")

BOOLQ = DATA_DIR / "benchmarks" / "boolq.jsonl.gz"
VOCAB = 320
FAST = {"max_examples": 120, "steps": 12, "batch_size": 16, "lr": 1e-3, "warmup": 0.1, "eval_every": 12}


@pytest.fixture(scope="module")
def tok_ref(tmp_path_factory) -> TokenizerRef:
    """A BPE trained on the BoolQ passages themselves (real text, seconds)."""
    texts = [r["passage"] + " " + r["question"] for r in read_jsonl(BOOLQ)]
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_bpe(iter(texts), TokenizerConfig(vocab_size=VOCAB, min_frequency=1)), folder)
    return TokenizerRef(path=str(folder), shards=ShardsRef(path=""))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> ModelRef:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base") / "model"
    save_model(GPT(GPTConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=2, n_embd=32)), folder)
    return ModelRef(path=str(folder))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hidden_states_are_forward_without_the_head(arch):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(arch=arch, vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(gpt.lm_head(gpt.hidden_states(idx)), gpt(idx)[0])


def test_input_format_and_truncation(tok_ref):
    tok = __import__("tasks.bpe", fromlist=["load_tokenizer"]).load_tokenizer(tok_ref.path)
    records = read_boolq(BOOLQ)[:20]
    counts = {"passages_truncated": 0, "dropped_question_too_long": 0}
    rows = encode(records, tok, 64, counts)
    start, delim, extract = (tok.token_to_id(t) for t in (EOT, END, role_token("assistant")))
    assert len(rows) == 20 and counts["passages_truncated"] == 20  # BoolQ passages are far longer than 64 tokens
    for (ids, label), r in zip(rows, records, strict=True):
        question = tok.encode(r["question"], add_special_tokens=False).ids
        assert len(ids) == 64 and ids[0] == start and ids[-1] == extract and label == r["label"]
        assert ids[-len(question) - 2] == delim and ids[-len(question) - 1 : -1] == question  # question kept whole
        assert ids[1:4] == tok.encode(r["passage"], add_special_tokens=False).ids[:3]  # the passage's start kept
    long_question = [{"passage": "a b", "question": "word " * 80, "label": 1}]
    assert encode(long_question, tok, 64, counts) == [] and counts["dropped_question_too_long"] == 1
    x, last, y, labels = make_batch([([start, 7, 8, delim, 9, extract], 1), ([start, 7, delim, 9, extract], 0)],
                                    tok.token_to_id(PAD), {start, delim, extract, tok.token_to_id(PAD)})
    assert last.tolist() == [5, 4] and labels.tolist() == [1, 0] and x[1, 5] == tok.token_to_id(PAD)
    assert y.tolist() == [[7, 8, -100, 9, -100, -100], [7, -100, 9, -100, -100, -100]]  # text tokens only


def test_head_training_lowers_held_out_loss_and_saves_a_loadable_classifier(base, tok_ref, tmp_path):
    """A random tiny model can learn nothing of BoolQ's answers, so the real records are relabelled by a rule it
    can learn: yes when the passage's first 120 characters hold a digit (82 of the 200)."""
    learnable = tmp_path / "boolq_digit.jsonl"
    learnable.write_text("".join(json.dumps(r | {"label": int(bool(re.search(r"\d", r["passage"][:120])))}) + "\n"
                                 for r in read_boolq(BOOLQ)))
    cfg = ClassifyConfig(**(FAST | {"data": str(learnable), "max_examples": None, "lm_weight": 0.0, "steps": 60,
                                    "lr": 3e-3, "eval_every": 60}))
    r = finetune_classifier(cfg, base, tok_ref, tmp_path)
    m = r.metrics
    assert m["classify/heldout_task_loss"] < 0.9 * m["classify/heldout_task_loss_before"]
    assert m["classify/heldout_acc"] > m["classify/majority_acc"] + 0.1
    assert r.counts["train"] + r.counts["held_out"] == 200 and r.counts["held_out"] == 40 and r.counts["steps"] == 60
    assert 0 < m["classify/majority_acc"] < 1 and (tmp_path / "classify.png").stat().st_size > 1000
    clf = load_classifier(r.path).eval()
    assert clf.labels == ["no", "yes"] and clf.meta["extract"] == role_token("assistant")
    idx = torch.randint(0, VOCAB, (3, 20))
    again = GPTClassifier(clf.gpt, clf.labels, 0.0)
    again.head.load_state_dict(clf.head.state_dict())
    save_classifier(again, tmp_path / "copy")
    torch.testing.assert_close(load_classifier(tmp_path / "copy")(idx, torch.tensor([19, 5, 0]))[0],
                               clf(idx, torch.tensor([19, 5, 0]))[0], rtol=0, atol=0)


def test_lm_weight_adds_a_real_lm_term(base, tok_ref, tmp_path):
    fast = FAST | {"steps": 24, "eval_every": 24}
    off = finetune_classifier(ClassifyConfig(lm_weight=0.0, **fast), base, tok_ref, tmp_path / "off")
    on = finetune_classifier(ClassifyConfig(lm_weight=0.5, **fast), base, tok_ref, tmp_path / "on")
    (h_off, h_on) = (json.loads(r.file("history").read_text()) for r in (off, on))
    step, total, task, lm = h_on["train"][0]
    assert lm > 1.0 and total == pytest.approx(task + 0.5 * lm, rel=1e-5)
    assert h_off["train"][0][1] == pytest.approx(task, rel=1e-5)  # same start, same batch: the same task loss
    # training on L_LM too lowers the held-out LM loss much more than the task loss alone does
    assert on.metrics["classify/heldout_lm_loss"] < off.metrics["classify/heldout_lm_loss"] - 0.2


@pytest.mark.parametrize("line, message", [
    ({"passage": "p", "label": 1}, "needs 'passage' and 'question'"),
    ({"passage": "p", "question": "q"}, "field 'label'"),
    ({"passage": "p", "question": "q", "label": 2}, "field 'label'"),
    ({"query": "Passage: p\nQuestion: q?", "choices": ["yes", "no"], "gold": 0}, "choices must be"),
])
def test_a_bad_record_is_an_error_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "boolq.jsonl"
    path.write_text(json.dumps({"passage": "p", "question": "q", "answer": True}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(GptflowError, match=message) as e:
        read_boolq(path)
    assert f"{path}:2" in str(e.value)


def test_both_boolq_layouts_read_the_same(tmp_path):
    plain = {"passage": "Some text.", "question": "is it true", "label": 1}
    foundry = {"query": "Passage: Some text.\nQuestion: is it true?", "choices": ["no", "yes"], "gold": 1}
    path = tmp_path / "two.jsonl"
    path.write_text(json.dumps(plain) + "\n" + json.dumps(foundry) + "\n")
    assert read_boolq(path) == [plain, plain]


@pytest.mark.slow
def test_classify_task_logs_its_run_and_registers_a_loadable_classifier(base, tok_ref, tmp_path, sqlite_mlflow):
    from flows.stages import classify_task

    cfg = ClassifyConfig(lm_weight=0.5, model_name="gpt-boolq-test", **FAST)
    ref = classify_task.fn(cfg, base, tok_ref, str(tmp_path / "runs"))
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    (run,) = MlflowClient().search_runs([exp.experiment_id], "tags.stage = 'classify'")
    metrics = run.data.metrics
    assert metrics["classify/heldout_acc"] == ref.metrics["classify/heldout_acc"]
    assert {"classify/majority_acc", "classify/heldout_task_loss_before", "classify/lm_weight"} <= set(metrics)
    assert metrics["classify/held_out"] == 24 and run.data.params["lm_weight"] == "0.5"
    assert {"manifest.json", "classify.png", "history.json"} <= {
        a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    version = MlflowClient().get_model_version_by_alias("gpt-boolq-test", "candidate")
    assert version.run_id == run.info.run_id and version.tags["stage_key"] == ref.key
    model = mlflow.pyfunc.load_model("models:/gpt-boolq-test@candidate")
    records = read_boolq(BOOLQ)[:3]
    out = model.predict([{"passage": r["passage"], "question": r["question"]} for r in records])
    clf = load_classifier(ref.path).eval()
    tok = __import__("tasks.bpe", fromlist=["load_tokenizer"]).load_tokenizer(tok_ref.path)
    x, last, _, _ = make_batch(encode(records, tok, 64, {"passages_truncated": 0, "dropped_question_too_long": 0}),
                               tok.token_to_id(PAD), set())
    p = torch.softmax(clf(x, last)[0], -1)
    assert [o["label"] for o in out] == [clf.labels[k] for k in p.argmax(-1).tolist()]
    assert [o["probability"] for o in out] == pytest.approx(p.max(-1).values.tolist(), abs=1e-5)


def test_the_pipeline_runs_the_stage_only_when_asked():
    from flows.presets import resolve

    assert resolve("tiny").run_classify is False
    cfg = resolve("tiny", {"run_classify": True, "classify.lm_weight": 0.0})
    assert cfg.run_classify and cfg.classify.lm_weight == 0.0 and cfg.classify.model_name == "gpt-boolq"


def test_a_plain_model_folder_is_not_a_classifier(base):
    with pytest.raises(ValueError, match="not a classifier folder, missing .*head.safetensors"):
        load_classifier(base.path)
