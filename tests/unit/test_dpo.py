"""DPO made a Ray Train stage: its losses equal TRL's on the same log-probs, the stored reference log-probs equal a
fresh pass of the reference, bad pairs are counted by reason, and a 2-worker run on real preference pairs raises
held-out preference accuracy and logs its per-step metrics to a sqlite MLflow run. (Exact resume after a kill is
the shared loop's: tested on pretraining, SFT and PPO, whose state is a superset of DPO's.)
Run: `pytest tests/unit/test_dpo.py -x -q` (Ray start-up and three fits: ~1.5 min idle, ~6 min on a busy 2-core machine).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from infra.env import DATA_DIR
from models.checkpoint import load_config, load_model, save_model
from models.gpt import GPT, GPTConfig
from tasks.bpe import save_tokenizer, train_bpe
from tasks.chat import IGNORE, read_preferences, render
from tasks.conversations import PreferenceSource, adapt_pairs
from tasks.dpo import DPOConfig, encode_pairs, save_pairs, train_dpo
from tasks.dpo_worker import PairArrays, dpo_loss, sequence_logps
from tasks.refs import ModelRef, RunLink, ShardsRef, TokenizerRef
from tasks.tokenizer import TokenizerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = DATA_DIR / "preference" / "dpo_en_demo.json.gz"
VOCAB = 512
# 2 workers x 8 pairs (16 rows of <= 65 tokens) per step, 40 steps over 216 training pairs (~3 epochs); a
# checkpoint every 8 steps
CFG = DPOConfig(sources=str(DATA), max_pairs=240, val_fraction=0.1, steps=40, batch_size=8, lr=2e-3,
                warmup_steps=2, log_every=4, eval_every=20, ckpt_every=8, seed=0)
STEPS, LOGGED = list(range(1, 41)), list(range(4, 41, 4))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[ModelRef, TokenizerRef]:
    """A BPE trained on the pairs' own texts and a random llama-style model (context 64) as the 'SFT' model."""
    root = tmp_path_factory.mktemp("inputs")
    texts = [t for prompt, c, r in read_preferences(DATA) for t in [m["content"] for m in prompt] + [c, r]]
    tok = train_bpe(iter(texts), TokenizerConfig(vocab_size=VOCAB), parallel=False)
    save_tokenizer(tok, root / "tok")
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(arch="llama", vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=32,
                             dropout=0.1)), root / "base")
    return ModelRef(path=str(root / "base")), TokenizerRef(path=str(root / "tok"), shards=ShardsRef(path=""))


def _tok(inputs):
    from tasks.bpe import load_tokenizer

    return load_tokenizer(Path(inputs[1].path))


# ---------------------------------------------------------------- the loss against TRL's


def _trl_loss(loss_type: str, beta: float, per_token: torch.Tensor, completion_mask: torch.Tensor,
              ref_logps: torch.Tensor) -> torch.Tensor:
    """TRL 1.16's DPO loss on given log-probs. TRL has no standalone loss function: the formula lives inside
    `DPOTrainer._compute_loss(self, model, inputs, return_outputs)`, which we call unbound with the few trainer
    attributes it reads. Its `model(..., fused_lm_head=True)` returns per-token log-probs of the completion
    tokens (zero elsewhere) as `.log_probs`; ours returns the very per-token log-probs our loss sums, so the
    comparison is of the losses alone. `precompute_ref_logps=True` makes it read the reference's summed
    log-probs from the batch, as our stage does."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n = per_token.shape[0]
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, use_weighting=False, label_smoothing=0.0, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    T = per_token.shape[1] + 1
    inputs = {"input_ids": torch.zeros(n, T, dtype=torch.long), "attention_mask": torch.ones(n, T, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_logps[:, 0],
              "ref_rejected_logps": ref_logps[:, 1]}
    return DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)


@pytest.mark.parametrize(("kind", "normalize", "trl_type"),
                         [("sigmoid", False, "sigmoid"), ("sigmoid", True, "sigmoid_norm"), ("ipo", True, "ipo")])
def test_losses_equal_trl_on_the_same_log_probs(inputs, kind, normalize, trl_type):
    """Real pairs, a policy and a reference that differ (two random models): our loss to TRL's within 1e-5."""
    rows, _ = encode_pairs(read_preferences(DATA)[:8], _tok(inputs), 64, "truncate")
    folder = Path(inputs[0].path).parent / f"trl_{trl_type}"
    save_pairs(rows, folder, 0)
    x, y, _, n_tokens = PairArrays(folder).batch(np.arange(len(rows)))
    torch.manual_seed(1)
    policy, ref = load_model(Path(inputs[0].path)).eval(), GPT(load_config(Path(inputs[0].path))).eval()
    with torch.no_grad():
        logits = policy(x)[0]
        per_token = torch.gather(torch.log_softmax(logits, -1), 2, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        per_token = per_token * (y != IGNORE)  # (2B, T): the policy's log-prob of each answer token, 0 elsewhere
        ours_policy = sequence_logps(policy, x, y)[0].view(2, -1).T  # (B, 2)
        ref_logps = sequence_logps(ref, x, y)[0].view(2, -1).T
    assert (ours_policy - ref_logps).abs().min() > 0.01  # no log ratio is zero: the loss is not trivial
    ours = dpo_loss(ours_policy, ref_logps, n_tokens, beta=0.1, kind=kind, length_normalize=normalize)[0].mean()
    completion_mask = torch.cat([torch.zeros(len(y), 1, dtype=torch.long), (y != IGNORE).long()], 1)  # unshifted
    theirs = _trl_loss(trl_type, 0.1, per_token, completion_mask, ref_logps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- bad pairs


def test_bad_pairs_are_counted_by_reason(inputs):
    rows = [{"chosen": "\n\nHuman: hi?\n\nAssistant: hello there", "rejected": "\n\nHuman: hi?\n\nAssistant: hello there"},
            {"chosen": "\n\nHuman: hi?\n\nAssistant: ", "rejected": "\n\nHuman: hi?\n\nAssistant: go away"},
            {"chosen": "\n\nHuman: hi?\n\nAssistant: hello", "rejected": "\n\nHuman: hi?\n\nAssistant: go away"}]
    pairs, counts = adapt_pairs(rows, ["chosen", "rejected"], PreferenceSource(path="pairs.jsonl"))
    assert len(pairs) == 1 and counts["dropped/identical_replies"] == counts["dropped/empty_reply"] == 1
    tok = _tok(inputs)
    long_prompt = [{"role": "user", "content": "a long question " * 40}]
    same_start = [{"role": "user", "content": "hi"}]
    tail = "word " * 80
    cases = [(long_prompt, "yes", "no"), (same_start, tail + "yes", tail + "no"), (same_start, "yes", "no")]
    kept, counts = encode_pairs(cases, tok, 64, "truncate")
    assert len(kept) == 2 and counts == {"truncated": 2, "dropped/identical_after_truncation": 1}
    assert all(len(ids) <= 65 for pair in kept for ids, _ in pair)
    (c_ids, c_labels), (r_ids, _) = kept[0]  # the long prompt: its start cut, its end and the whole answers kept
    assert c_ids[-1] == r_ids[-1] == tok.token_to_id("<|end|>") and c_ids[:-3] == r_ids[:-3]
    assert tok.decode(c_ids, skip_special_tokens=True).strip().endswith("question yes")
    whole = render(long_prompt + [{"role": "assistant", "content": "yes"}], tok, 10_000)[1]
    assert sum(v != IGNORE for v in c_labels) == sum(v != IGNORE for v in whole) > 0  # "yes" and <|end|>, whole
    kept, counts = encode_pairs(cases, tok, 64, "skip")
    assert len(kept) == 1 and counts == {"dropped/too_long": 2}


# ---------------------------------------------------------------- a run on Ray


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory) -> RunLink:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("dpo-test"))
    return RunLink(run_id=run.info.run_id, tracking_uri=uri)


@pytest.fixture(scope="module")
def fitted(inputs, mlflow_run, ray_once, tmp_path_factory) -> tuple[Path, ModelRef]:
    out = tmp_path_factory.mktemp("dpo")
    with open(out / "progress.txt", "w") as bar:
        return out, train_dpo(CFG, *inputs, out, mlflow_run, progress_file=bar)


@pytest.mark.ray
@pytest.mark.slow
def test_dpo_run_raises_held_out_preference_accuracy(fitted, inputs, mlflow_run):
    from mlflow.tracking import MlflowClient

    out, ref = fitted
    m, c = ref.metrics, ref.counts
    assert m["dpo/val_loss_after"] < m["dpo/val_loss_before"] - 0.05, m
    assert m["dpo/val_reward_acc_after"] > max(m["dpo/val_reward_acc_before"], 0.6), m
    assert m["dpo/val_reward_acc_before"] == 0  # the policy starts as the reference: every margin exactly 0
    assert m["dpo/val_prefers_chosen_after"] >= m["dpo/val_prefers_chosen_before"], m
    assert m["dpo/val_margin_before"] == pytest.approx(0, abs=1e-3) and m["dpo/val_margin_after"] > 0
    assert c["train"] + c["val"] == c["kept"] == 240 - c.get("dropped/no_answer_in_context", 0) - c.get(
        "dropped/identical_after_truncation", 0)
    assert c["truncated"] > 0 and c["data/records"] == 300  # real answers outgrow the 64-token context
    assert load_config(Path(ref.path)) == load_config(Path(inputs[0].path))  # the SFT model's config (dropout on)
    history = json.loads((out / "history.json").read_text())
    assert [s for s, _ in history["train"]] == STEPS
    assert [h["step"] for h in history["val_dpo"]] == [0, 20, 40]
    assert [row[0] for row in history["dpo"]] == LOGGED
    client = MlflowClient(mlflow_run.tracking_uri)
    for key in ("train/loss", "dpo/chosen_reward", "dpo/rejected_reward", "dpo/margin", "dpo/reward_acc"):
        assert [x.step for x in client.get_metric_history(mlflow_run.run_id, key)] == LOGGED, key
    assert [x.step for x in client.get_metric_history(mlflow_run.run_id, "val/reward_acc")] == [20, 40]
    margins = [x.value for x in client.get_metric_history(mlflow_run.run_id, "dpo/margin")]
    assert margins[-1] > margins[0]
    assert (out / "margins.png").stat().st_size > 1000 and (out / "loss_curve.png").stat().st_size > 1000
    bar = (out / "progress.txt").read_text()
    assert "dpo: 100%" in bar and "40/40" in bar


@pytest.mark.ray
@pytest.mark.slow
def test_stored_reference_log_probs_equal_a_fresh_pass(fitted, inputs):
    """The reference's log-probs stored before training are those of the SFT model, pair by pair (computed here
    one row at a time, without padding), and the workers never changed them."""
    out, _ = fitted
    model = load_model(Path(inputs[0].path)).eval()
    for split in ("train", "val"):
        pairs = PairArrays(out / "pairs" / split)
        fresh = np.zeros_like(pairs.ref)
        with torch.no_grad():
            for i in range(min(pairs.n, 40)):
                x, y, _, _ = pairs.batch(np.array([i]))
                for side in range(2):
                    T = int(pairs.lengths[i, side]) - 1  # this row alone, its own length
                    fresh[i, side] = sequence_logps(model, x[side : side + 1, :T], y[side : side + 1, :T])[0].item()
        np.testing.assert_allclose(fresh[:40], pairs.ref[:40], rtol=0, atol=1e-4)


def test_bench_times_the_stage_step_with_stored_and_live_reference():
    """`bench.rlhf_dpo.dpo_step_seconds` runs the stage's step on real pairs both ways (a smoke test: it measures)."""
    from bench.rlhf_dpo import GPT2_VOCAB_PADDED, dpo_step_seconds

    cfg = GPTConfig(arch="llama", vocab_size=GPT2_VOCAB_PADDED, block_size=64, n_layer=1, n_head=2, n_embd=32)
    stored = dpo_step_seconds(cfg, batch_size=2, steps=1, warmup=0)
    live = dpo_step_seconds(cfg, batch_size=2, steps=1, warmup=0, live_reference=True)
    for r in (stored, live):
        assert r["seconds_per_step"] > 0 and r["pairs"] == 2 and 0 < r["tokens_per_step"] <= 2 * 2 * 65


def test_a_non_finite_loss_or_reference_stops_the_stage(inputs, tmp_path):
    """A model that gives NaN: the reference pass names the pair, the training loss names the step."""
    from tasks.dpo_worker import DPOBatches, store_reference_logps
    from tasks.stage import GptflowError

    rows, _ = encode_pairs(read_preferences(DATA)[:4], _tok(inputs), 64, "truncate")
    for split in ("train", "val"):
        save_pairs(rows, tmp_path / split, 0)
    broken = load_model(Path(inputs[0].path))
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")
    save_model(broken, tmp_path / "broken")
    with pytest.raises(GptflowError, match="log-probability of pair 0 is not finite"):
        store_reference_logps(tmp_path / "broken", tmp_path / "train", 2)
    data = DPOBatches(tmp_path, CFG)
    w = SimpleNamespace(world=1, rank=0, accum=1, device=torch.device("cpu"))
    (micro,) = data.micro_batches(w, 0)
    assert torch.isfinite(data.loss(load_model(Path(inputs[0].path)), micro))
    with pytest.raises(GptflowError, match="DPO loss is not finite at step 1"):
        data.loss(broken, micro)
