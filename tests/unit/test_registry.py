"""The registry and its eval gate: versions reused for unchanged weights, `candidate` on the judged version, and
`champion` moved only by a candidate that beats the champion by more than the standard error. Against a real
MLflow store (sqlite) with real saved models; the gate's inputs are given scores, so each case is exact."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.stages import promote_task, register_task
from models.checkpoint import save_model
from models.config import GPTConfig
from models.gpt import GPT
from tasks.refs import ModelRef, TokenizerRef
from tasks.registry import MEAN_ACC, RegistryConfig, Score, decide, score_tags, scores_from_tags, scores_of
from tasks.stage import path_sha256

pytestmark = pytest.mark.usefixtures("one_thread", "sqlite_mlflow")

NAME = "gpt-gate-test"
SETUP = "setup-1"


def _model(folder, seed: int) -> ModelRef:
    torch.manual_seed(seed)
    save_model(GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)), folder)
    return ModelRef(path=str(folder), sha256=path_sha256(folder))


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TokenizerRef:
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    folder = tmp_path_factory.mktemp("tok")
    Tokenizer(BPE()).save(str(folder / "tokenizer.json"))
    return TokenizerRef(path=str(folder), sha256=path_sha256(folder))


def _scores(acc: float, se: float) -> dict[str, Score]:
    return {MEAN_ACC: Score(value=acc, stderr=se), "arc_easy/acc": Score(value=acc, stderr=se * 2)}


def _register(model, tok, acc, se, method="dpo"):
    reg = RegistryConfig(model_name=NAME)
    tags = {"eval_setup": SETUP, **score_tags(_scores(acc, se))}
    registered = register_task.fn(reg.model_copy(update={"aliases": [method]}), model, tok, tags, None, method)
    decision = promote_task.fn(reg, registered, method, _scores(acc, se), SETUP, {"arc_easy": 0.01})
    return registered, decision


def _alias(alias: str) -> int:
    return int(MlflowClient().get_model_version_by_alias(NAME, alias).version)


def test_first_then_worse_then_better_then_unchanged(tmp_path, tok):
    first, d1 = _register(_model(tmp_path / "a", 0), tok, acc=0.30, se=0.01)
    assert d1.outcome == "first" and d1.promote
    assert _alias("champion") == _alias("candidate") == first.version

    # worse, and better by less than the margin sqrt(0.01^2 + 0.01^2) = 0.0141: the champion stays
    for i, acc in enumerate((0.25, 0.31)):
        worse, d = _register(_model(tmp_path / f"w{i}", 10 + i), tok, acc=acc, se=0.01)
        assert d.outcome == "kept" and not d.promote, d
        assert d.rows[0].margin == pytest.approx(math.hypot(0.01, 0.01))
        assert _alias("candidate") == worse.version and _alias("champion") == first.version
        version = MlflowClient().get_model_version(NAME, str(worse.version))
        assert version.tags["gate.outcome"] == "kept"
        assert version.tags[f"gate.{MEAN_ACC}.champion"] == repr(0.30)
        assert version.tags["contamination.arc_easy"] == "0.0100"
        assert "Gate: kept" in version.description and "| mean/acc | 0." in version.description

    better, d = _register(_model(tmp_path / "b", 20), tok, acc=0.40, se=0.01)
    assert d.outcome == "promoted" and d.champion_version == first.version
    assert _alias("champion") == _alias("candidate") == better.version

    n_versions = len(MlflowClient().search_model_versions(f"name = '{NAME}'"))
    again, d = _register(_model(tmp_path / "b2", 20), tok, acc=0.40, se=0.01)  # the same weights, saved again
    assert again.reused and again.version == better.version
    assert len(MlflowClient().search_model_versions(f"name = '{NAME}'")) == n_versions
    assert d.outcome == "already-champion" and not d.promote


def test_the_gate_compares_only_the_same_eval_setup_and_every_gate_metric():
    champ_tags = {"eval_setup": SETUP, **score_tags(_scores(0.30, 0.01))}
    cand = _scores(0.50, 0.01)
    other = decide(cand, "another-setup", champ_tags, 1, 2, [MEAN_ACC])
    assert other.outcome == "not-comparable" and not other.promote
    # better on the mean but not on arc_easy's own (wider) margin: 0.305 - 0.30 < hypot(0.02, 0.02)
    mixed = {MEAN_ACC: Score(value=0.5, stderr=0.01), "arc_easy/acc": Score(value=0.305, stderr=0.02)}
    d = decide(mixed, SETUP, champ_tags, 1, 2, [MEAN_ACC, "arc_easy/acc"])
    assert d.outcome == "kept" and [r.beats for r in d.rows] == [True, False]
    lower = decide({"wikitext/word_perplexity": Score(value=90.0, stderr=None)}, SETUP,
                   {"eval_setup": SETUP, "score.wikitext/word_perplexity": "100.0"}, 1, 2,
                   ["wikitext/word_perplexity"])
    assert lower.promote  # perplexity: lower is better
    with pytest.raises(ValueError, match="hellaswag/acc_norm"):
        decide(cand, SETUP, champ_tags, 1, 2, ["hellaswag/acc_norm"])


def test_scores_carry_stderrs_and_the_mean_acc_combines_them():
    scores = scores_of({"a": {"acc": 0.5, "acc_norm": 0.6}, "b": {"acc": 0.3}, "w": {"word_perplexity": 9.0}},
                       {"a": {"acc": 0.03, "acc_norm": 0.04}, "b": {"acc": 0.04}, "w": {"word_perplexity": None}})
    assert scores[MEAN_ACC].value == pytest.approx(0.4)
    assert scores[MEAN_ACC].stderr == pytest.approx(math.sqrt(0.03**2 + 0.04**2) / 2)
    assert scores["w/word_perplexity"].stderr is None
    assert scores_from_tags(score_tags(scores)) == scores


_REGISTER = """
import os, sys, time
from flows.stages import register_task
from tasks.refs import ModelRef, TokenizerRef
from tasks.registry import RegistryConfig
from tasks import tracking
model, tok, sha_m, sha_t, go = sys.argv[1:6]
lookup = tracking.find_version
def slow_lookup(*args):  # widen the window between "is it there?" and "register it" to make the race certain
    found = lookup(*args)
    time.sleep(2)
    return found
tracking.find_version = slow_lookup
print("READY", flush=True)
while not os.path.exists(go):  # both start registering together, imports done
    time.sleep(0.01)
reg = register_task.fn(RegistryConfig(model_name="gpt-race-test", aliases=["dpo"]), ModelRef(path=model, sha256=sha_m),
                       TokenizerRef(path=tok, sha256=sha_t), {}, None, "dpo")
print("VERSION", reg.version, reg.reused)
"""


def test_two_runs_registering_the_same_weights_at_once_make_one_version(tmp_path, tok):
    import os
    import subprocess
    import sys

    from infra.env import REPO_ROOT

    model = _model(tmp_path / "m", 30)
    go = tmp_path / "go"
    args = [sys.executable, "-c", _REGISTER, model.path, tok.path, model.sha256, tok.sha256, str(go)]
    procs = [subprocess.Popen(args, cwd=REPO_ROOT, env=os.environ.copy(), stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    assert all(p.stdout.readline().strip() == "READY" for p in procs)
    go.touch()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = sorted(line.split()[1:] for out in outs for line in out.splitlines() if line.startswith("VERSION"))
    assert results == [["1", "False"], ["1", "True"]], outs  # one registered it, the other found it
    assert len(MlflowClient().search_model_versions("name = 'gpt-race-test'")) == 1


@pytest.mark.slow  # imports transformers, logs, downloads and loads a model: ~25 s of CPU, ~55 s on a busy machine
def test_a_version_holds_the_model_in_hugging_face_format_with_its_card_and_lineage(tmp_path, tok):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infra.env import REPO_ROOT
    from models.checkpoint import load_model
    from tasks.model_card import DatasetFacts
    from tasks.stage import file_sha256

    crawl = sorted((REPO_ROOT / "data" / "crawl").glob("*.gz"))[0]
    datasets = [DatasetFacts(stage="data", name="input_0", path=str(crawl), sha256=file_sha256(crawl)),
                DatasetFacts(stage="eval", name="benchmarks", path=str(tmp_path), sha256="b" * 64)]
    model = _model(tmp_path / "hf-src", 40)
    card = "# gpt-hf-test\n\n## Data\n\ncrawl and chat data\n"
    tags = {"score.mean/acc": "0.25"}
    reg = register_task.fn(RegistryConfig(model_name="gpt-hf-test"), model, tok, tags, None, None, card, datasets)

    client = MlflowClient()
    version = client.get_model_version("gpt-hf-test", str(reg.version))
    folder = mlflow.artifacts.download_artifacts(f"models:/gpt-hf-test/{reg.version}", dst_path=str(tmp_path / "dl"))
    hf = tmp_path / "dl" / "artifacts" / "hf"
    assert (hf / "README.md").read_text() == card, sorted(p.name for p in (tmp_path / "dl").rglob("*"))
    theirs, tokenizer = AutoModelForCausalLM.from_pretrained(hf), AutoTokenizer.from_pretrained(hf)
    assert tokenizer.chat_template
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    ours = load_model(model.path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids)[0], rtol=1e-4, atol=1e-4)
    assert folder  # the whole logged model came down, the native weights beside the HF folder
    # lineage: the registering run read the crawl file (its digest), and the logged model is the run's output
    # with its scores against the benchmarks
    run = client.get_run(version.run_id)
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert inputs[crawl.name].digest == file_sha256(crawl)[:20] and str(crawl.name) in inputs[crawl.name].source
    assert version.source.startswith("models:/m-"), version.source  # the logged model (sqlite keeps no model_id)
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == version.run_id
    assert [(m.key, m.value, m.dataset_name) for m in logged.metrics] == [("mean/acc", 0.25, "benchmarks")]


def test_a_model_transformers_cannot_load_is_registered_without_an_hf_folder(tmp_path, tok, caplog):
    """qk_norm has no transformers equivalent: the version holds our weights (loadable, same logits) and no hf/."""
    import mlflow

    from models.checkpoint import load_model

    torch.manual_seed(3)
    folder = tmp_path / "qk"
    save_model(GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, qk_norm=True)), folder)
    model = ModelRef(path=str(folder), sha256=path_sha256(folder))
    reg = register_task.fn(RegistryConfig(model_name="gpt-qk-test"), model, tok, {}, None, None)
    dl = tmp_path / "dl"
    mlflow.artifacts.download_artifacts(f"models:/gpt-qk-test/{reg.version}", dst_path=str(dl))
    assert not (dl / "artifacts" / "hf").exists() and (dl / "artifacts" / "qk").is_dir(), sorted(
        str(p.relative_to(dl)) for p in dl.rglob("*"))
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    torch.testing.assert_close(load_model(dl / "artifacts" / "qk")(ids)[0], load_model(folder)(ids)[0])
    assert "no hf/ folder, transformers has no equivalent of qk_norm=true" in caplog.text
