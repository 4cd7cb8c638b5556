"""Scoring paths of the evaluation: lm-eval's `hf` backend on the Hugging Face export against our `GPTFlowLM` on
the native checkpoint, a model with known log-likelihoods, the request cache keyed by the model's content, the
chat template, greedy generation with the KV cache, the arithmetic task, few-shot seeds and per-sample files.

Offline, CPU, a tiny BPE (with our chat tokens) trained here on the bundled benchmark text and a 2-layer GPT
trained on it for a few steps. Run: `python -m pytest tests/unit/test_eval_paths.py -x -q`.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from fitting import fit_rows
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from eval.harness import _simple_evaluate, run_benchmarks
from eval.lm import GPTFlowLM, pick_device
from eval.taskgen import write_task_configs
from models.checkpoint import save_model
from models.gpt import GPT, GPTConfig
from models.tokens import SPECIAL_TOKENS

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "data" / "benchmarks"
BLOCK = 64

pytestmark = pytest.mark.usefixtures("one_thread")


def _read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _samples(out_dir: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "samples" / f"{task}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    texts = [d["page"] for d in _read(BUNDLE / "wikitext.jsonl.gz")]
    texts += [d["goal"] + " " + d["sol1"] + " " + d["sol2"] for d in _read(BUNDLE / "piqa.jsonl.gz")]
    texts += [d["question"] for d in _read(BUNDLE / "arithmetic.jsonl.gz")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _trained_gpt(tokenizer_json: Path, seed: int, steps: int = 20) -> GPT:
    """A 2-layer GPT trained a little on WikiText, so its choices get different log-likelihoods."""
    tok = Tokenizer.from_file(str(tokenizer_json))
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=BLOCK, n_layer=2, n_head=2, n_embd=32))
    text = " ".join(d["page"] for d in _read(BUNDLE / "wikitext.jsonl.gz")[:2])
    ids = torch.tensor(tok.encode(text).ids[: 32 * (BLOCK + 1)]).view(32, BLOCK + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_json) -> Path:
    return save_model(_trained_gpt(tokenizer_json, seed=0), tmp_path_factory.mktemp("model") / "model")


# ----------------------------------------------------------------------------------------------------------
# two scoring paths: lm-eval's hf backend on the export, ours on the checkpoint


def test_hf_backend_and_ours_agree_on_the_same_requests(model_dir, tokenizer_json, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from models.export import export_hf

    hf_dir = export_hf(model_dir, tokenizer_json, tmp_path / "hf")
    names = ["hellaswag", "winogrande", "lambada_openai", "wikitext"]  # choices, partial scoring, last word, rolling
    task_dir = write_task_configs(BUNDLE, tmp_path / "tasks", names)
    # the export's tokenizer has no BOS token and adds no special tokens: HFLM's defaults score what ours scores
    hf = HFLM(pretrained=str(hf_dir), tokenizer=str(hf_dir), device="cpu", dtype="float32", batch_size=4)
    ours = GPTFlowLM(model_dir=model_dir, tokenizer=tokenizer_json, batch_size=4, device="cpu")
    runs = {}
    for kind, lm in (("hf", hf), ("ours", ours)):
        runs[kind] = _simple_evaluate(lm, [f"gptflow_{n}" for n in names], 2, task_dir, bootstrap_iters=0,
                                      num_fewshot=0, seed=1234, chat_template=False, cache=None)
    for name in (f"gptflow_{n}" for n in names):
        theirs, mine = runs["hf"]["results"][name], runs["ours"]["results"][name]
        for metric in ("acc,none", "acc_norm,none", "perplexity,none", "word_perplexity,none"):
            if metric in theirs:
                assert mine[metric] == pytest.approx(theirs[metric], rel=1e-6, abs=1e-6), (name, metric)
        for a, b in zip(runs["hf"]["samples"][name], runs["ours"]["samples"][name], strict=True):
            assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
            lls_a = [r[0] if isinstance(r, tuple) else r for r in a["filtered_resps"]]
            lls_b = [r[0] if isinstance(r, tuple) else r for r in b["filtered_resps"]]
            assert lls_b == pytest.approx(lls_a, abs=1e-4, rel=1e-6), name
    choices = [r[0] for r in runs["ours"]["samples"]["gptflow_hellaswag"][0]["filtered_resps"]]
    assert len(set(choices)) == 4  # a model that tells the choices apart, not a constant


def test_batches_run_longest_first_and_padding_changes_nothing(model_dir, tokenizer_json, monkeypatch):
    from lm_eval.api.instance import Instance

    texts = ["Which is larger, 3 or 8?", "The man", " = Robert Boulter = is an English film actor .", "x y z w", "A"]
    reqs = [Instance("loglikelihood", {}, (t, " and then"), i) for i, t in enumerate(texts)]
    batched = GPTFlowLM(model_dir=model_dir, tokenizer=tokenizer_json, batch_size=3, device="cpu")
    alone = GPTFlowLM(model_dir=model_dir, tokenizer=tokenizer_json, batch_size=1, device="cpu")
    widths = []
    batched.model.wte.register_forward_pre_hook(lambda _, args: widths.append(args[0].shape))  # every (B, T) fed
    got, ref = batched.loglikelihood(reqs), alone.loglikelihood(reqs)
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in ref], abs=1e-5)
    assert [g for _, g in got] == [g for _, g in ref]
    assert [s[0] for s in widths] == [3, 2] and widths[0][1] > widths[1][1]  # two batches, the longest first

    monkeypatch.setattr("eval.lm.LOGITS_BUDGET", 3 * batched.model.config.vocab_size)  # room for 3 target rows
    widths.clear()
    small = batched.loglikelihood(reqs)
    assert len(widths) == len(reqs)  # " and then" is 2 targets: one request per batch
    assert [ll for ll, _ in small] == pytest.approx([ll for ll, _ in got], abs=1e-5)


# ----------------------------------------------------------------------------------------------------------
# known values: every token has probability 1/V


class Uniform(torch.nn.Module):
    """Logits all zero: every next token has probability 1/V, so a continuation of n tokens scores -n log V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.config = SimpleNamespace(block_size=BLOCK, vocab_size=vocab)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # for .to() and the parameter count

    def forward(self, idx: torch.Tensor, *_, **__):
        return torch.zeros(*idx.shape, self.config.vocab_size) + 0 * self.anchor, None


def _first_argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def test_uniform_model_scores_what_the_data_implies(tokenizer_json, tmp_path):
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    V, n = tok.get_vocab_size(), 25
    out = tmp_path / "run"
    summary = run_benchmarks(tmp_path, tokenizer_json, ["piqa", "arc_easy", "wikitext"], n, BUNDLE, out,
                             batch_size=8, device="cpu", model=Uniform(V))

    def n_tokens(ctx: str, cont: str) -> int:
        return len(tok.encode(ctx + cont, add_special_tokens=False).ids) - len(tok.encode(ctx, add_special_tokens=False).ids)

    docs = {
        "piqa": [(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"])
                 for d in _read(BUNDLE / "piqa.jsonl.gz")[:n]],
        "arc_easy": [(f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
                      d["choices"]["label"].index(d["answerKey"])) for d in _read(BUNDLE / "arc_easy.jsonl.gz")[:n]],
    }
    for task, items in docs.items():
        acc = acc_norm = 0
        for (ctx, choices, gold), line in zip(items, _samples(out, task), strict=True):
            lls = [-n_tokens(ctx, " " + c) * math.log(V) for c in choices]
            assert line["loglikelihoods"] == pytest.approx(lls, rel=1e-6)
            acc += _first_argmax(lls) == gold
            acc_norm += _first_argmax([ll / len(c) for ll, c in zip(lls, choices, strict=True)]) == gold
        assert summary["results"][task]["acc"] == pytest.approx(acc / n, abs=1e-12), task
        assert summary["results"][task]["acc_norm"] == pytest.approx(acc_norm / n, abs=1e-12), task
    for d, line in zip(_read(BUNDLE / "wikitext.jsonl.gz"), _samples(out, "wikitext"), strict=True):
        tokens = len(tok.encode(wikitext_detokenizer(d), add_special_tokens=False).ids)
        assert math.exp(-line["loglikelihoods"][0] / tokens) == pytest.approx(V, rel=1e-6)  # V per token (float32 sums)


def test_samples_files_have_one_line_per_document(model_dir, tokenizer_json, tmp_path):
    out = tmp_path / "run"
    summary = run_benchmarks(model_dir, tokenizer_json, ["arc_easy", "lambada_openai"], 4, BUNDLE, out, device="cpu")
    records = _read(BUNDLE / "arc_easy.jsonl.gz")[:4]
    lines = _samples(out, "arc_easy")
    assert [line["doc_id"] for line in lines] == [0, 1, 2, 3]
    for line, doc in zip(lines, records, strict=True):
        assert set(line) == {"doc_id", "metrics", "loglikelihoods", "target"}
        assert set(line["metrics"]) == {"acc", "acc_norm"} and len(line["loglikelihoods"]) == len(doc["choices"]["text"])
        assert line["target"] == doc["choices"]["label"].index(doc["answerKey"])
        assert line["metrics"]["acc"] == float(_first_argmax(line["loglikelihoods"]) == line["target"])
    assert summary["results"]["arc_easy"]["acc"] == pytest.approx(sum(x["metrics"]["acc"] for x in lines) / 4)
    lam = _samples(out, "lambada_openai")
    assert len(lam) == 4 and all(len(x["loglikelihoods"]) == 1 for x in lam)
    assert summary["stderr"]["arc_easy"]["acc"] is not None


# ----------------------------------------------------------------------------------------------------------
# the request cache never serves one model's answers to another


def test_request_cache_is_keyed_by_the_model_content(model_dir, tokenizer_json, tmp_path):
    tasks, cache = ["arc_easy", "lambada_openai"], tmp_path / "cache"

    def run(model, name, cache_dir):
        summary = run_benchmarks(model_dir, tokenizer_json, tasks, 3, BUNDLE, tmp_path / name, device="cpu",
                                 model=model, cache_dir=cache_dir)
        return summary, [x["loglikelihoods"] for t in tasks for x in _samples(tmp_path / name, t)]

    first, second = _trained_gpt(tokenizer_json, seed=0), _trained_gpt(tokenizer_json, seed=1)
    calls = []
    first.wte.register_forward_pre_hook(lambda *_: calls.append(1))  # one per forward pass of the first model
    s1, lls1 = run(first, "a", cache)
    assert calls
    s2, lls2 = run(second, "b", cache)
    s2_fresh, lls2_fresh = run(second, "b_nocache", None)
    assert s1["config"]["model_hash"] != s2["config"]["model_hash"]
    assert lls2 != lls1 and lls2 == lls2_fresh and s2["results"] == s2_fresh["results"]
    assert len(list(cache.glob("*.db"))) == 2  # one file per model

    calls.clear()
    s1_again, lls1_again = run(first, "a_again", cache)
    assert calls == [] and lls1_again == lls1 and s1_again["results"] == s1["results"]  # all from the cache


# ----------------------------------------------------------------------------------------------------------
# chat template, generation, the arithmetic task, few-shot


def test_chat_prompt_is_what_sft_and_grpo_trained_on(model_dir, tokenizer_json, tmp_path):
    from lm_eval.tasks import TaskManager

    from tasks.chat import render
    from tasks.verifiable import VerifiablePrompt, prompt_ids

    tok = Tokenizer.from_file(str(tokenizer_json))
    lm = GPTFlowLM(model_dir=model_dir, tokenizer=tokenizer_json, device="cpu")
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which is larger, 3 or 8?"},
             {"role": "assistant", "content": "8"}, {"role": "user", "content": "And 12 or 40?"}]
    ids, _ = render(turns, tok, 1 << 20)
    assert lm.tok_encode(lm.apply_chat_template(turns)) == ids + [tok.token_to_id("<|assistant|>")]
    assert lm.tok_encode(lm.apply_chat_template(turns, add_generation_prompt=False)) == ids
    with pytest.raises(ValueError, match="'tool'"):
        lm.apply_chat_template([{"role": "tool", "content": "x"}])

    # through lm-eval: the arithmetic task's chat prompts are GRPO's prompt_ids
    tm = TaskManager(include_path=str(write_task_configs(BUNDLE, tmp_path / "t", ["arithmetic"])), include_defaults=False)
    task = tm.load(["gptflow_arithmetic"])["tasks"]["gptflow_arithmetic"]
    task.build_all_requests(limit=3, apply_chat_template=True, chat_template=lm.apply_chat_template,
                            tokenizer_name=lm.tokenizer_name)
    for inst in task.instances:
        prompt = VerifiablePrompt(question=inst.doc["question"], answer=inst.doc["answer"])
        assert lm.tok_encode(inst.args[0]) == prompt_ids(prompt, tok)


def test_generate_until_with_kv_cache_equals_no_cache(model_dir, tokenizer_json):
    from lm_eval.api.instance import Instance

    contexts = ["Which is larger, 3 or 8?", "The man is sitting on a roof. He", "x", " = Robert Boulter = " * 8]
    reqs = [Instance("generate_until", {}, (c, {"until": ["<never>"], "max_gen_toks": 10}), i)
            for i, c in enumerate(contexts)]
    reqs.append(Instance("generate_until", {}, ("The man is", {"until": ["\n"], "max_gen_toks": 5}), 9))
    cached = GPTFlowLM(model_dir=model_dir, tokenizer=tokenizer_json, batch_size=3, device="cpu")
    plain = GPTFlowLM(model_dir=model_dir, tokenizer=tokenizer_json, batch_size=1, device="cpu", use_kv_cache=False)
    got, ref = cached.generate_until(reqs), plain.generate_until(reqs)
    assert got == ref
    assert sum(len(cached.tok_encode(t)) for t in got[:4]) > 10  # it did generate


def test_arithmetic_task_is_held_out_and_scored_by_the_checker(model_dir, tokenizer_json, tmp_path):
    from tasks.grpo import GRPOConfig
    from tasks.verifiable import benchmark_prompts, make_prompts, score_response

    bundled = _read(BUNDLE / "arithmetic.jsonl.gz")
    assert bundled == [p.model_dump() for p in benchmark_prompts()]  # the bundle is what the generator makes
    cfg = GRPOConfig()
    train, _ = make_prompts(cfg.task, cfg.max_operand, cfg.val_prompts, cfg.seed)
    assert len(bundled) == 100 and not {p.question for p in train} & {d["question"] for d in bundled}
    doc = bundled[0]
    assert score_response(doc, [f" {doc['answer']}"]) == {"exact_match": 1.0}
    assert score_response(doc, [f"{doc['answer']} or"]) == {"exact_match": 0.0}

    # a GPT fitted to the first three answers (chat-rendered, as GRPO prompts) gets them right, and the fourth not
    model = _fit_answers(tokenizer_json, bundled[:3])
    out = tmp_path / "run"
    summary = run_benchmarks(model_dir, tokenizer_json, ["arithmetic"], 4, BUNDLE, out, device="cpu",
                             chat_template=True, model=model)
    lines = _samples(out, "arithmetic")
    assert [x["doc_id"] for x in lines] == [0, 1, 2, 3]
    assert [x["response"] for x in lines[:3]] == [str(d["answer"]) for d in bundled[:3]]  # stopped at <|end|>
    assert [x["metrics"]["exact_match"] for x in lines] == [1.0, 1.0, 1.0, 0.0]
    assert all(x["target"] == str(d["answer"]) for x, d in zip(lines, bundled, strict=False))
    assert summary["results"]["arithmetic"]["exact_match"] == 0.75


def _fit_answers(tokenizer_json: Path, docs: list[dict], steps: int = 400) -> GPT:
    """A fresh GPT trained on `<|user|>question<|end|><|assistant|>answer<|end|>` of `docs` until it recites them."""
    from tasks.verifiable import VerifiablePrompt, answer_ids, prompt_ids

    tok = Tokenizer.from_file(str(tokenizer_json))
    rows = [prompt_ids(p, tok) + answer_ids(p, tok) for p in (VerifiablePrompt(**d) for d in docs)]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=BLOCK, n_layer=2, n_head=2, n_embd=32))
    fit_rows(model, rows, steps, stop_below=0.01)
    return model


def test_fewshot_examples_follow_the_seed(model_dir, tokenizer_json, tmp_path):
    lm = GPTFlowLM(model_dir=model_dir, tokenizer=tokenizer_json, device="cpu")
    task_dir = write_task_configs(BUNDLE, tmp_path / "t", ["arc_easy"])

    def contexts(shots, seed):
        raw = _simple_evaluate(lm, ["gptflow_arc_easy"], 3, task_dir, bootstrap_iters=0, num_fewshot=shots,
                               seed=seed, chat_template=False, cache=None)
        return [s["arguments"][0][0] for s in raw["samples"]["gptflow_arc_easy"]]

    zero, one, again, other = contexts(0, 1), contexts(1, 1), contexts(1, 1), contexts(1, 2)
    assert all(c.count("Question:") == 1 for c in zero) and all(c.count("Question:") == 2 for c in one)
    assert one == again and one != other
    assert all(o.endswith(z) for o, z in zip(one, zero, strict=True))

    task_dir = write_task_configs(BUNDLE, tmp_path / "a", ["arithmetic"])  # chat: the example is an earlier turn
    raw = _simple_evaluate(lm, ["gptflow_arithmetic"], 2, task_dir, bootstrap_iters=0, num_fewshot=1, seed=1,
                           chat_template=True, cache=None)
    for s in raw["samples"]["gptflow_arithmetic"]:
        ctx = s["arguments"][0][0]
        assert ctx.count("<|user|>") == 2 and ctx.count("<|assistant|>") == 2 and ctx.endswith("?<|end|><|assistant|>")


def test_device_auto_picks_the_gpu_when_there_is_one(model_dir, tokenizer_json):
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"
    lm = GPTFlowLM(model_dir=model_dir, tokenizer=tokenizer_json)
    assert next(lm.model.parameters()).device.type == pick_device("auto").type
