"""The reward model: scores read at the last response token, save/load, the Bradley-Terry loss against TRL's
RewardTrainer, bad pairs counted by reason, and one 2-worker Ray Train run through the Prefect task that learns,
logs to a sqlite MLflow run and registers a pyfunc that scores (prompt, answer) records.
Run: `pytest tests/unit/test_reward.py -x -q` (about a minute: TRL's import, Ray start-up and one fit)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from infra.env import DATA_DIR
from models.checkpoint import load_model, save_model
from models.gpt import GPT, GPTConfig
from models.reward import RewardModel, bradley_terry_loss, load_reward_model, pad_rows, save_reward_model
from tasks.bpe import load_tokenizer
from tasks.chat import read_sft
from tasks.refs import ModelRef, ShardsRef, TokenizerRef
from tasks.reward import RewardConfig, encode_pairs, prepare_pairs
from tasks.stage import GptflowError

ALPACA = DATA_DIR / "sft" / "alpaca_en_demo.json.gz"
TINY = GPTConfig(arch="llama", vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=32)


def _hh(prompt: str, answer: str) -> str:
    return f"\n\nHuman: {prompt}\n\nAssistant: {answer}"


@pytest.fixture(scope="module")
def inputs(alpaca_tokenizer, tmp_path_factory) -> tuple[ModelRef, TokenizerRef, Path]:
    """The session's BPE of the Alpaca sample, a random tiny base model, and real pairs with a signal a tiny model
    can learn: an Alpaca answer (chosen) against the same words in reverse order (rejected). Same words, same
    length: the longer-reply baseline sits at chance."""
    root = tmp_path_factory.mktemp("inputs")
    convos = read_sft(ALPACA)
    torch.manual_seed(0)
    save_model(GPT(TINY), root / "base")
    short = [c for c in convos if len(c) == 2 and len(c[1]["content"]) < 250 and len(c[1]["content"].split()) > 3
             and len(c[0]["content"]) < 200][:240]
    with open(root / "pairs.jsonl", "w") as f:
        for user, assistant in short:
            answer = assistant["content"]
            f.write(json.dumps({"chosen": _hh(user["content"], answer),
                                "rejected": _hh(user["content"], " ".join(reversed(answer.split())))}) + "\n")
    return (ModelRef(path=str(root / "base")), TokenizerRef(path=str(alpaca_tokenizer), shards=ShardsRef(path="")),
            root / "pairs.jsonl")


# ---------------------------------------------------------------- the model


def test_the_score_is_read_at_each_rows_last_token():
    torch.manual_seed(0)
    rm = RewardModel.from_gpt(GPT(TINY)).eval()
    rows = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    idx, lengths = pad_rows(rows, pad_id=1)
    assert idx.shape == (3, 6) and lengths.tolist() == [3, 6, 1]
    with torch.no_grad():
        batched = rm(idx, lengths)
        alone = torch.cat([rm(torch.tensor([r]), torch.tensor([len(r)])) for r in rows])
        other_pad = rm(idx.masked_fill(idx == 1, 99), lengths)  # whatever follows the last token
        moved = rm(idx, torch.tensor([2, 6, 1]))  # row 0 read one token earlier
    assert batched.shape == (3,) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(batched, other_pad, rtol=0, atol=1e-6)
    assert not torch.isclose(moved[0], batched[0]) and torch.equal(moved[1:], batched[1:])
    with pytest.raises(AssertionError, match="lengths must lie in 1..6"):
        rm(idx, torch.tensor([0, 6, 1]))


def test_from_gpt_copies_the_trunk_and_save_load_gives_equal_scores(tmp_path):
    torch.manual_seed(0)
    gpt = GPT(TINY.model_copy(update={"tie_embeddings": False}))
    rm = RewardModel.from_gpt(gpt, meta={"note": "x"})
    assert torch.equal(rm.wte.weight, gpt.wte.weight) and rm.wte.weight.data_ptr() != gpt.wte.weight.data_ptr()
    assert not rm.lm_head.weight.requires_grad  # untied: the unused LM head is frozen (DDP needs every grad)
    with torch.no_grad():
        rm.score.bias.fill_(0.5)
    save_reward_model(rm, tmp_path / "rm")
    assert {p.name for p in (tmp_path / "rm").iterdir()} == {"model.safetensors", "config.json",
                                                           "reward_head.safetensors", "reward_head.json"}
    back = load_reward_model(tmp_path / "rm")
    assert not back.training and back.meta == {"note": "x"}
    idx, lengths = pad_rows([[3, 4, 5, 6], [7, 8]], pad_id=1)
    rm.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx, lengths), rm(idx, lengths), rtol=0, atol=0)
    trunk = load_model(tmp_path / "rm")  # our checkpoint format: eval, chat and the registry read the trunk
    assert torch.equal(trunk.lm_head.weight, gpt.lm_head.weight)
    with pytest.raises(ValueError, match="not a reward model folder"):
        load_reward_model(tmp_path / "nothing")


@pytest.mark.slow
def test_bradley_terry_loss_equals_trl_reward_trainer(inputs, tmp_path):
    """TRL 1.16's RewardTrainer.compute_loss, run on its own collated batch of our token rows, with our reward
    model's scores as the model output; our loss on the same batch agrees to 1e-5."""
    from types import SimpleNamespace

    from datasets import Dataset
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    base, tok_ref, pairs = inputs
    tok = load_tokenizer(Path(tok_ref.path))
    cfg = RewardConfig(sources=str(pairs), max_pairs=8)
    from tasks.conversations import PreferenceSource, load_pairs

    encoded, _ = encode_pairs(load_pairs(PreferenceSource(path=str(pairs)))[0][:8], tok, TINY.block_size, cfg.too_long)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>")
    # TRL's trainer needs a model of its own to start; its compute_loss is then called with ours
    hf = GPT2ForSequenceClassification(GPT2Config(vocab_size=512, n_positions=128, n_embd=16, n_layer=1, n_head=2,
                                                  num_labels=1, pad_token_id=hf_tok.pad_token_id,
                                                  eos_token_id=hf_tok.eos_token_id, bos_token_id=hf_tok.eos_token_id))
    data = Dataset.from_dict({"chosen_ids": [c for c, _, _, _ in encoded], "rejected_ids": [r for _, r, _, _ in encoded]})
    trainer = RewardTrainer(model=hf, args=TRLRewardConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                                           per_device_train_batch_size=8),
                            train_dataset=data, processing_class=hf_tok)
    batch = trainer.data_collator(list(trainer.train_dataset))  # TRL's own collation, in the data's order
    torch.manual_seed(1)
    rm = RewardModel.from_gpt(load_model(Path(base.path))).eval()
    with torch.no_grad():
        # a head pointed from the rejected rows' mean last hidden state to the chosen rows': a loss far from log 2
        ids, lengths = batch["input_ids"], batch["attention_mask"].sum(1)
        h = rm.hidden_states(ids)[torch.arange(len(ids)), lengths - 1]  # (2B, C)
        rm.score.weight.copy_(200 * (h[:8].mean(0) - h[8:].mean(0)).unsqueeze(0))
        ours_scores = rm(batch["input_ids"], batch["attention_mask"].sum(1))  # TRL pads on the right, as we do

        class Scores(torch.nn.Module):  # what TRL reads from a sequence-classification model: .logits (2B, 1)
            def forward(self, input_ids, attention_mask, use_cache=None):
                return SimpleNamespace(logits=rm(input_ids, attention_mask.sum(1)).unsqueeze(-1))

        trl_loss = trainer.compute_loss(Scores(), dict(batch))
    chosen, rejected = ours_scores.chunk(2)
    ours = bradley_terry_loss(chosen, rejected)
    assert batch["input_ids"].shape[0] == 16 and ours.item() < 0.6
    assert abs(ours.item() - trl_loss.item()) < 1e-5, (ours.item(), trl_loss.item())
    # the first rows of TRL's batch are our chosen rows: the same tokens, the same lengths
    assert batch["input_ids"][0, : len(encoded[0][0])].tolist() == encoded[0][0]


# ---------------------------------------------------------------- pairs


def test_bad_pairs_are_counted_by_reason(inputs, tmp_path):
    _, tok_ref, _ = inputs
    tok = load_tokenizer(Path(tok_ref.path))
    long = "word " * 200
    records = [{"chosen": _hh("hi", "hello there"), "rejected": _hh("hi", "go away")},  # kept
               {"chosen": _hh("hi", "same"), "rejected": _hh("hi", "same")},  # identical replies
               {"chosen": _hh("hi", ""), "rejected": _hh("hi", "no")},  # empty reply
               {"chosen": _hh(long, "yes indeed"), "rejected": _hh(long, "no")},  # prompt cut (or skipped)
               {"chosen": _hh("hi", long), "rejected": _hh("hi", "no")}]  # a reply longer than the context
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records * 2))
    counts = prepare_pairs(RewardConfig(sources=str(path), val_fraction=0.3), tok, 128, tmp_path / "truncate")
    assert counts["data/dropped/identical_replies"] == 2 and counts["data/dropped/empty_reply"] == 2
    assert counts["dropped/reply_too_long"] == 2 and counts["truncated_prompt"] == 2 and counts["dropped/too_long"] == 0
    assert counts["kept"] == 4 and counts["train"] + counts["val"] == 4
    skip = prepare_pairs(RewardConfig(sources=str(path), val_fraction=0.3, too_long="skip"), tok, 128, tmp_path / "s")
    assert skip["dropped/too_long"] == 2 and skip["truncated_prompt"] == 0 and skip["kept"] == 2
    with np_load(tmp_path / "truncate" / "train.npz") as z:
        assert z["chosen_len"].max() <= 128 and z["rejected_len"].max() <= 128
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text("".join(json.dumps(r) + "\n" for r in records[1:3]))
    with pytest.raises(GptflowError, match="only_bad.jsonl: too few preference pairs"):
        prepare_pairs(RewardConfig(sources=str(only_bad)), tok, 128, tmp_path / "none")


def np_load(path: Path):
    import numpy as np

    return np.load(path, allow_pickle=False)


def test_a_non_finite_score_stops_the_stage(inputs, tmp_path):
    from tasks.reward_worker import PairBatches

    _, tok_ref, pairs = inputs
    prepare_pairs(RewardConfig(sources=str(pairs), max_pairs=10), load_tokenizer(Path(tok_ref.path)), 128, tmp_path)
    data = PairBatches(tmp_path, torch.device("cpu"))
    rm = RewardModel.from_gpt(GPT(TINY))
    with torch.no_grad():
        rm.score.bias.fill_(float("nan"))
    idx, lengths = data.train.batch([0, 1], data.pad_id)
    with pytest.raises(GptflowError, match="non-finite scores"):
        data.loss(rm, (idx, lengths, 1.0))


# ---------------------------------------------------------------- one Ray Train fit, through the Prefect task

# 2 workers x 8 pairs per step; 36 steps = 576 pairs drawn, ~3 epochs of the ~200 training pairs; a checkpoint at
# step 18, which the resume test restarts from.
FIT = dict(max_pairs=240, val_fraction=0.2, steps=36, batch_size=8, lr=2e-3, warmup_steps=4, log_every=6,
           eval_every=18, ckpt_every=18, num_workers=2, seed=0, model_name="gpt-reward-test")


@pytest.fixture(scope="module")
def fitted(inputs, sqlite_mlflow, ray_once, tmp_path_factory):
    from flows.stages import reward_task

    base, tok, pairs = inputs
    root = tmp_path_factory.mktemp("runs")
    return reward_task.fn(RewardConfig(sources=str(pairs), **FIT), base, tok, str(root))


@pytest.mark.ray
@pytest.mark.slow
def test_a_two_worker_fit_learns_the_preference(fitted):
    m, c = fitted.metrics, fitted.counts
    history = json.loads(Path(fitted.files["history"]).read_text())
    assert [s for s, _ in history["train"]] == list(range(1, 37))
    assert [h["step"] for h in history["held_out"]] == [0, 18, 36]
    first, last = (sum(v for _, v in history["train"][k]) / 6 for k in (slice(0, 6), slice(-6, None)))
    assert last < first - 0.2, history["train"]  # the Bradley-Terry loss falls
    assert m["reward/val_accuracy_longer_baseline"] == pytest.approx(0.5, abs=0.1)  # same words, same length
    assert m["reward/val_accuracy"] >= 0.75 and m["reward/val_accuracy"] > m["reward/val_accuracy_before"], m
    assert m["reward/val_loss"] < m["reward/val_loss_before"]
    assert c["train"] + c["val"] == c["kept"] and c["val"] >= 40 and c["data/kept"] == 240
    assert Path(fitted.files["reward_curve"]).stat().st_size > 1000


@pytest.mark.ray
@pytest.mark.slow
def test_the_task_logs_its_run_and_registers_a_pyfunc_that_scores(fitted, inputs, sqlite_mlflow):
    from tasks.tracking import EXPERIMENT

    client = MlflowClient()
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'reward'")
    assert run.data.metrics["reward/val_accuracy"] == fitted.metrics["reward/val_accuracy"]
    assert [h.step for h in client.get_metric_history(run.info.run_id, "train/accuracy")] == list(range(6, 37, 6))
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val/accuracy")] == [18, 36]
    assert {"train/margin", "train/reward_chosen", "train/reward_rejected", "val/margin"} <= set(run.data.metrics)
    assert {"reward_curve.png", "history.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    version = client.get_model_version_by_alias("gpt-reward-test", "candidate")
    assert version.run_id == run.info.run_id and version.tags["stage_key"] == fitted.key

    # the registered pyfunc scores (prompt messages, answer) as the stage encoded its rows
    _, tok_ref, pairs = inputs
    from tasks.conversations import PreferenceSource, load_pairs

    some = load_pairs(PreferenceSource(path=str(pairs)))[0][:3]
    model = mlflow.pyfunc.load_model("models:/gpt-reward-test@candidate")
    out = model.predict([{"messages": p, "answer": a} for p, c, r in some for a in (c, r)])
    encoded, _ = encode_pairs(some, load_tokenizer(Path(tok_ref.path)), TINY.block_size, "truncate")
    rows = [row for c, r, _, _ in encoded for row in (c, r)]
    rm = load_reward_model(Path(fitted.path))
    with torch.no_grad():
        direct = rm(*pad_rows(rows, pad_id=1))
    assert [o["reward"] for o in out] == pytest.approx(direct.tolist(), abs=1e-5)


def test_gptflow_reward_resolves_its_config_from_the_preset(capsys, tmp_path):
    from flows.cli import main

    assert main(["reward", "--model", str(tmp_path), "--set", "steps=7", "--set", "too_long=skip", "--print-config"]) == 0
    cfg = RewardConfig.model_validate_json(capsys.readouterr().out)
    assert cfg.steps == 7 and cfg.too_long == "skip" and cfg.model_name == "gpt-tiny-reward"  # the preset's name
    assert [s.path for s in cfg.sources] == ["data/preference/hh_rlhf_harmless_sample.jsonl.gz",
                                            "data/preference/dpo_en_demo.json.gz"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_resumed_run_continues_exactly(fitted, inputs, tmp_path):
    """The module's fit resumed from its step-18 checkpoint: its Ray run folder copied with the last checkpoint's
    weights cut short (as by a crash mid-copy), the rerun restores step 18 and ends as the uninterrupted fit did:
    the same losses and held-out metrics at every step. One fit of 18 steps on the session's Ray."""
    import shutil

    from tasks.reward import train_reward_model

    base, tok, pairs = inputs
    out = tmp_path / "stage"
    shutil.copytree(Path(fitted.files["history"]).parent / "ray", out / "ray")
    last = out / "ray" / "reward" / f"checkpoint_{FIT['steps']:06d}"
    for weights in last.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:1000])
    resumed = train_reward_model(RewardConfig(sources=str(pairs), **FIT), base, tok, out)
    a, b = (json.loads(Path(r.files["history"]).read_text()) for r in (fitted, resumed))
    assert b["resumes"] == [FIT["ckpt_every"]] and a["resumes"] == []
    assert [s for s, _ in b["train"]] == list(range(1, 37)) and [h["step"] for h in b["held_out"]] == [0, 18, 36]
    assert [v for _, v in b["train"]] == pytest.approx([v for _, v in a["train"]], abs=1e-5)
    for x, y in zip(a["held_out"], b["held_out"], strict=True):
        assert x == pytest.approx(y, abs=1e-5)
    assert resumed.metrics["reward/val_accuracy"] == pytest.approx(fitted.metrics["reward/val_accuracy"], abs=1e-6)


@pytest.mark.ray
@pytest.mark.slow
def test_an_fsdp_fit_follows_the_ddp_fit(fitted, inputs, tmp_path):
    """Sharding the trunk and the head changes where the state lives, not the arithmetic."""
    from tasks.reward import train_reward_model

    base, tok, pairs = inputs
    fsdp = train_reward_model(RewardConfig(sources=str(pairs), strategy="fsdp", **FIT), base, tok, tmp_path)
    a, b = (json.loads(Path(r.files["history"]).read_text()) for r in (fitted, fsdp))
    assert [v for _, v in b["train"]] == pytest.approx([v for _, v in a["train"]], abs=1e-4)
    for x, y in zip(a["held_out"], b["held_out"], strict=True):
        assert x == pytest.approx(y, abs=1e-4)
