"""PPO: the arithmetic against closed forms and TRL, and the stage on real Ray Train workers (a toy reward rises
while the KL to the SFT model stays bounded; a killed run resumes to the same curves).
Run: `pytest tests/unit/test_ppo.py -q` (the math in about a second; with `-m "not ray"` only that; the Ray tests
take about two minutes: Ray start-up and two fits, one of them killed and resumed)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from infra.env import DATA_DIR
from tasks.ppo_loss import (
    AdaptiveKL,
    RunningMoments,
    explained_variance,
    gae,
    kl_rewards,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)

DATA = DATA_DIR / "sft" / "alpaca_en_demo.json.gz"


def _batch(seed: int = 0, B: int = 5, R: int = 9) -> dict[str, torch.Tensor]:
    """Random per-token tensors with right-padded rows of lengths 1..R."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([R, 1, 4, R - 1, 6][:B])
    mask = (torch.arange(R).unsqueeze(0) < lengths.unsqueeze(1)).float()
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    old = rnd(B, R) - 2
    return {"mask": mask, "rewards": rnd(B, R) * mask, "values": rnd(B, R), "adv": rnd(B, R),
            "old_logp": old, "logp": old + 0.3 * rnd(B, R), "ref_logp": old + 0.1 * rnd(B, R)}


# ---------------------------------------------------------------- the arithmetic


def test_gae_equals_its_closed_form_per_row():
    """A_t = sum_l (gamma*lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V after the row's end = 0."""
    b = _batch()
    gamma, lam = 0.97, 0.9
    adv, ret = gae(b["rewards"], b["values"], b["mask"], gamma, lam)
    for i, n in enumerate(b["mask"].sum(1).long().tolist()):
        r, v = b["rewards"][i, :n], torch.cat([b["values"][i, :n], torch.zeros(1, dtype=torch.float64)])
        delta = r + gamma * v[1:] - v[:-1]
        expected = torch.stack([sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) for t in range(n)])
        torch.testing.assert_close(adv[i, :n], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(ret[i, :n], expected + v[:-1], rtol=0, atol=1e-6)
        assert (adv[i, n:] == 0).all() and (ret[i, n:] == 0).all()  # nothing beyond the row's end


def test_kl_rewards_put_the_score_on_each_rows_last_token():
    b = _batch()
    scores = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0], dtype=torch.float64)
    rewards, kl = kl_rewards(scores, b["logp"], b["ref_logp"], b["mask"], kl_coef=0.1)
    torch.testing.assert_close(kl, (b["logp"] - b["ref_logp"]) * b["mask"])
    expected = -0.1 * kl
    for i, n in enumerate(b["mask"].sum(1).long().tolist()):
        expected[i, n - 1] += scores[i]
    torch.testing.assert_close(rewards, expected)


def _trl_clipped_objective(logp, old_logp, adv, mask, clip):
    """TRL 1.16's `GRPOTrainer._compute_loss` on our batch: the trainer's per-token clipped surrogate, called on
    a bare instance (no model, no accelerate) whose log-prob function returns our log-probs.

    TRL 1.16 has no PPOTrainer any more; its GRPO loss is PPO's clipped surrogate per token, with advantages
    of shape (B, T) accepted as they are. With beta=0 (no KL term: InstructGPT puts the KL into the reward),
    token-level importance sampling and loss_type="bnpo" (the mean over every response token of the batch) it
    is exactly our `policy_loss`; its `clip_ratio/region_mean` is our clip fraction."""
    from trl import GRPOTrainer

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.__dict__.update(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=0.0,
        loss_type="bnpo", epsilon_low=clip, epsilon_high=clip, args=SimpleNamespace(delta=None), use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=SimpleNamespace(reduce=lambda t, reduction: t, gather=lambda t: t),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None))
    B, R = logp.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, R, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old_logp}
    loss = trainer._compute_loss(None, inputs)
    return loss, trainer._metrics["train"]["clip_ratio/region_mean"][0]


def test_clipped_surrogate_equals_trls():
    for seed in range(3):
        b = _batch(seed)
        ours, clip_frac = policy_loss(b["logp"], b["old_logp"], b["adv"], b["mask"], clip=0.2)
        theirs, trl_clip_frac = _trl_clipped_objective(b["logp"], b["old_logp"], b["adv"], b["mask"], clip=0.2)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        assert 0 < clip_frac.item() < 1 and abs(clip_frac.item() - trl_clip_frac) < 1e-5


def test_clipped_losses_stop_the_gradient_outside_the_trust_region():
    """A token whose ratio left [1-eps, 1+eps] in the advantage's direction gets no policy gradient; a value
    further than `clip` from the rollout's in the wrong direction gets none either."""
    mask = torch.ones(1, 2)
    logp = torch.tensor([[0.5, 0.05]], requires_grad=True)  # ratios e^0.5 (outside) and e^0.05 (inside)
    policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), mask, clip=0.2)[0].backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0
    values = torch.tensor([[1.0, 0.1]], requires_grad=True)
    value_loss(values, torch.zeros(1, 2), torch.full((1, 2), 2.0), mask, clip=0.2).backward()
    assert values.grad[0, 0] == 0  # moved 1.0 from 0: the clipped error (0.2 - 2)^2 is the larger, and flat
    assert values.grad[0, 1] != 0  # moved 0.1: inside the clip


def test_whiten_moments_and_adaptive_kl():
    b = _batch()
    w = whiten(b["adv"], b["mask"])
    assert abs(masked_mean(w, b["mask"]).item()) < 1e-9 and (w * (1 - b["mask"]) == 0).all()
    x = np.random.default_rng(0).normal(3.0, 2.0, size=1000)
    m = RunningMoments()
    for chunk in np.split(x, [100, 350, 700]):
        m.update(chunk.mean(), chunk.var(), len(chunk))
    assert abs(m.mean - x.mean()) < 1e-9 and abs(m.var - x.var()) < 1e-9 and m.count == 1000
    kl = AdaptiveKL(0.1, target=6.0, horizon=10000)
    kl.update(12.0, 1000)  # KL twice the target: the error is clipped at 0.2
    assert kl.coef == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    fixed = AdaptiveKL(0.1, target=None, horizon=10000)
    fixed.update(100.0, 1000)
    assert fixed.coef == 0.1
    assert explained_variance(b["values"], b["values"], b["mask"]) == 1.0


def test_config_keeps_checkpoints_between_iterations():
    from tasks.ppo import PPOConfig

    with pytest.raises(ValueError, match="multiple of ppo_epochs"):
        PPOConfig(ppo_epochs=2, minibatches=3, ckpt_every=4)
    with pytest.raises(ValueError, match="ddp"):
        PPOConfig(strategy="fsdp")
    assert PPOConfig(ppo_epochs=2, minibatches=3, ckpt_every=12).steps_per_iteration == 6


def test_a_nan_reward_stops_the_rollout(inputs):
    """A scorer that returns NaN: the stage stops with the rollout, prompt and response named."""
    from contextlib import nullcontext

    from models.checkpoint import load_config, load_model
    from models.value import load_value_gpt
    from tasks.ppo import PPOConfig
    from tasks.ppo_worker import PPOBatches
    from tasks.stage import GptflowError
    from tasks.train_worker import Worker

    model, _, prompts, _ = inputs
    cfg = PPOConfig(reward_token="x", batch_size=2, minibatches=1, response_len=4)
    raw = load_value_gpt(Path(model.path))
    w = Worker(cfg, 0, 1, torch.device("cpu"), raw, raw, raw.configure_optimizer(1e-3, 0.0), nullcontext(), 1,
               load_config(Path(model.path)))
    nan = lambda p, r: torch.tensor([1.0, float("nan")])  # noqa: E731
    data = PPOBatches(cfg, prompts, load_model(Path(model.path)).eval(), nan)
    with pytest.raises(GptflowError, match=r"reward of rollout 1 on rank 0 is nan"):
        data.micro_batches(w, 0)


def test_prompts_too_long_are_counted_and_the_reward_must_be_one_token(inputs):
    """A prompt that leaves fewer than response_len tokens of context is skipped and counted; a toy reward of
    several tokens, or no reward at all, is a one-line error."""
    from tasks.bpe import load_tokenizer
    from tasks.ppo import PPOConfig, _reward_spec, load_prompts
    from tasks.stage import GptflowError

    tok = load_tokenizer(Path(inputs[1].path))
    short = PPOConfig(sources=str(DATA), max_prompts=100, val_prompts=4, response_len=8)
    train, val, ptx, counts = load_prompts(short, tok, 128)
    assert len(train) + len(val) + counts["prompts_too_long"] == 100 and len(ptx) == len(train)
    assert all(len(p) + 8 <= 128 and p[-1] == tok.token_to_id("<|assistant|>") for p in train + val)
    long = short.model_copy(update={"response_len": 100})
    assert load_prompts(long, tok, 128)[3]["prompts_too_long"] > counts["prompts_too_long"]
    with pytest.raises(GptflowError, match="not one"):
        _reward_spec(short.model_copy(update={"reward_token": "hello world"}), None, tok)
    with pytest.raises(GptflowError, match="needs a reward"):
        _reward_spec(short, None, tok)
    assert _reward_spec(short.model_copy(update={"reward_token": "<|end|>"}), None, tok) == {
        "token_id": tok.token_to_id("<|end|>")}


def test_ppo_ptx_adds_the_lm_loss_of_its_rows(inputs):
    """PPO-ptx: the minibatch's loss grows by exactly ptx_coef times the LM loss of its ptx rows, although they
    share the rollouts' forward (padded to one length): the padding changes none of the rollouts' logits."""
    from contextlib import nullcontext

    from models.checkpoint import load_config, load_model
    from models.value import load_value_gpt
    from tasks.ppo import PPOConfig, token_scorer
    from tasks.ppo_worker import PPOBatches
    from tasks.train_worker import Worker

    model, _, prompts, _ = inputs
    cfg = PPOConfig(reward_token="x", batch_size=2, minibatches=1, response_len=4, ptx_coef=0.5, ptx_batch=3)
    raw = load_value_gpt(Path(model.path))
    w = Worker(cfg, 0, 1, torch.device("cpu"), raw, raw, raw.configure_optimizer(1e-3, 0.0), nullcontext(), 1,
               load_config(Path(model.path)))
    rows = {**prompts, "ptx": [p * 9 for p in prompts["train"]]}  # 90 tokens: longer than any rollout row
    data = PPOBatches(cfg, rows, load_model(Path(model.path)).eval(), token_scorer(5))
    [(ro, ptx)] = data.micro_batches(w, 0)
    assert ptx[0].shape == (3, 89) and ptx[0].size(1) > ro.seq.size(1)
    with torch.no_grad():
        lm = raw(*ptx)[1]
        gap = data.loss(raw, (ro, ptx)) - data.loss(raw, (ro, None))
    torch.testing.assert_close(gap, 0.5 * lm, rtol=0, atol=1e-5)
    assert "ppo/ptx_loss" in data.step_metrics(w)


# ---------------------------------------------------------------- inputs: a tokenizer and a lightly trained model


@pytest.fixture(scope="module")
def inputs(alpaca_tokenizer, tmp_path_factory, one_thread):
    """The session's BPE of the Alpaca sample, a 2-layer model given 60 steps of language modelling on it (so it says
    common tokens often enough for a toy reward to be found), the reward token (the sample's most frequent token)
    and the prompts as the driver writes them."""
    from models.checkpoint import save_model
    from models.gpt import GPT, GPTConfig
    from models.tokens import END, PAD
    from tasks.bpe import load_tokenizer
    from tasks.chat import read_sft, render
    from tasks.refs import ModelRef, ShardsRef, TokenizerRef

    root = tmp_path_factory.mktemp("inputs")
    convos = read_sft(DATA)
    tok = load_tokenizer(alpaca_tokenizer)
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="llama", vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=32))
    rows = [render(c, tok, 64)[0] for c in convos[:300]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x, y = torch.zeros(16, 64, dtype=torch.long), torch.full((16, 64), -100)
        for i, j in enumerate(torch.randint(0, len(rows), (16,), generator=g).tolist()):
            r = rows[j]
            x[i, : len(r) - 1], y[i, : len(r) - 1] = torch.tensor(r[:-1]), torch.tensor(r[1:])
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    save_model(model, root / "sft")
    common = Counter(t for r in rows for t in r).most_common(1)[0][0]
    prompts = {"train": [r[:10] for r in rows[:50]], "val": [r[:10] for r in rows[50:54]],
               "end_id": tok.token_to_id(END), "pad_id": tok.token_to_id(PAD)}
    return (ModelRef(path=str(root / "sft")), TokenizerRef(path=str(alpaca_tokenizer), shards=ShardsRef(path="")),
            prompts, tok.id_to_token(common))


# ---------------------------------------------------------------- the stage on Ray Train


def _cfg(reward_token: str):
    """2 workers x 16 rollouts (2 minibatches of 8) per iteration, 2 epochs: 4 steps per iteration, 6 iterations.
    A high learning rate, so that a few dozen steps move a 2-layer model."""
    from tasks.ppo import PPOConfig

    return PPOConfig(sources=str(DATA), max_prompts=200, val_prompts=8, reward_token=reward_token, response_len=16,
                     batch_size=8, minibatches=2, ppo_epochs=2, lr=1e-3, steps=24, log_every=2, eval_every=24,
                     ckpt_every=4, seed=0, num_workers=2)


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    from tasks.refs import RunLink

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("ppo-test"))
    return RunLink(run_id=run.info.run_id, tracking_uri=uri)


@pytest.fixture(scope="module")
def reference(inputs, ray_once, mlflow_run, tmp_path_factory):
    from tasks.ppo import train_ppo

    model, tok, _, token = inputs
    out = tmp_path_factory.mktemp("reference")
    with open(out / "progress.txt", "w") as bar:
        return out, train_ppo(_cfg(token), model, tok, out, mlflow_run, progress_file=bar)


@pytest.mark.ray
@pytest.mark.slow
def test_ppo_on_a_toy_reward_raises_it_with_bounded_kl(reference, inputs, mlflow_run):
    from mlflow.tracking import MlflowClient

    from models.checkpoint import load_config, load_model

    out, ref = reference
    history = json.loads((out / "history.json").read_text())
    rollouts = history["rollout"]
    assert [r["step"] for r in rollouts] == [0, 4, 8, 12, 16, 20]  # one rollout batch per iteration
    rewards, kls = [r["reward"] for r in rollouts], [r["kl"] for r in rollouts]
    assert np.mean(rewards[-2:]) > np.mean(rewards[:2]) + 0.3, rewards
    assert kls[0] == pytest.approx(0, abs=1e-5) and max(kls) < 10, kls  # the first batch is the reference's own
    assert [s for s, _ in history["train"]] == list(range(1, 25))
    assert ref.metrics["ppo/reward_last"] == rewards[-1] and ref.counts["prompts_train"] > 100
    assert ref.counts["prompts_too_long"] >= 0 and ref.counts["iterations"] == 6
    sft = Path(inputs[0].path)
    assert load_config(Path(ref.path)) == load_config(sft)  # a plain GPT with the SFT model's config
    assert not torch.equal(load_model(Path(ref.path)).wte.weight, load_model(sft).wte.weight)
    assert (out / "ppo_curves.png").stat().st_size > 0 and (out / "value_head.safetensors").exists()
    client = MlflowClient(mlflow_run.tracking_uri)
    for name in ("ppo/reward", "ppo/kl", "ppo/entropy", "ppo/clip_frac", "ppo/value_loss", "ppo/explained_variance",
                 "ppo/response_len", "perf/rollout_tokens_per_s", "train/loss"):
        history_m = client.get_metric_history(mlflow_run.run_id, name)
        assert [m.step for m in history_m] == list(range(2, 25, 2)), name
        assert all(np.isfinite(m.value) for m in history_m), name
    assert [m.step for m in client.get_metric_history(mlflow_run.run_id, "val/reward")] == [24]
    bar = (out / "progress.txt").read_text()
    assert "ppo: 100%" in bar and "24/24" in bar, bar[-500:]


_DRIVER = """
import sys
from pathlib import Path
from infra.env import setup_env
setup_env()
from tasks.refs import ModelRef, ShardsRef, TokenizerRef
from tasks.ppo import PPOConfig, train_ppo
train_ppo(PPOConfig.model_validate_json(sys.argv[1]), ModelRef(path=sys.argv[2]),
          TokenizerRef(path=sys.argv[3], shards=ShardsRef(path="")), Path(sys.argv[4]))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_killed_ppo_run_resumes_to_the_same_curves(reference, inputs, tmp_path):
    """The issue's kill-and-resume for an RL stage: the driver and its Ray are SIGKILLed after the second
    recorded checkpoint; the rerun resumes there and its losses, rewards and KLs equal the uninterrupted run's."""
    from killing import kill_after_checkpoint

    from tasks.ppo import train_ppo

    model, tok, _, token = inputs
    cfg, out = _cfg(token), tmp_path / "stage"
    killed_at = kill_after_checkpoint(_DRIVER, [cfg.model_dump_json(), model.path, tok.path, str(out)],
                                      out / "ray" / "ppo", 2 * cfg.ckpt_every, tmp_path / "killed_run.log")
    assert killed_at < cfg.steps and not (out / "model").exists(), "the kill came too late to test a resume"

    train_ppo(cfg, model, tok, out)  # the rerun: same folder, same RunConfig(name, storage_path)

    history = json.loads((out / "history.json").read_text())
    expected = json.loads((reference[0] / "history.json").read_text())
    assert history["resumes"] == [killed_at]
    steps, losses = np.array(history["train"]).T
    ref_steps, ref_losses = np.array(expected["train"]).T
    assert np.array_equal(steps, ref_steps)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    for key in ("step", "reward", "kl", "kl_coef", "response_len"):
        np.testing.assert_allclose([r[key] for r in history["rollout"]], [r[key] for r in expected["rollout"]],
                                   rtol=0, atol=1e-5, err_msg=key)
    for key in ("step", "reward", "kl"):
        np.testing.assert_allclose([h[key] for h in history["held_out"]], [h[key] for h in expected["held_out"]],
                                   rtol=0, atol=1e-5, err_msg=key)


def test_gptflow_ppo_resolves_its_config(capsys):
    """`gptflow ppo` has its own config (the pipeline config does not hold one yet) and takes --set keys."""
    from flows.cli import main

    assert main(["ppo", "--model", "m", "--set", "reward_token=<|end|>", "--set", "steps=8", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["reward_token"] == "<|end|>" and printed["steps"] == 8 and printed["kl_coef"] == 0.05
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    assert "--reward-model" in capsys.readouterr().out


def test_bench_rlhf_measures_the_cache_and_every_method(one_thread):
    """`python -m bench.rlhf` at toy size: both rollout speeds and the seconds per step of PPO, DPO and GRPO on
    one model (the numbers themselves belong to the bench, not to this test)."""
    from bench.rlhf import main

    r = main(["--layers", "1", "--embd", "32", "--batch", "4", "--prompt-len", "8", "--response-len", "16",
              "--threads", "1"])
    assert r["rollout_tokens_per_s_cache"] > 0 and r["rollout_tokens_per_s_no_cache"] > 0
    assert 0 < r["ppo_update_s_per_step"] < r["ppo_s_per_step"]  # an iteration's step also pays for its rollouts
    assert r["dpo_s_per_step"] > 0 and r["dpo_live_reference_s_per_step"] > 0
    assert r["grpo_s_per_step"] > 0 and 0 < r["grpo_rollout_share"] < 1
