"""GRPO: the checker and the prompt generator, our advantages and loss against TRL 1.16's `GRPOTrainer` on the
same batch, and a 2-worker Ray run that raises held-out accuracy on its task (exact resume after a kill is the shared
loop's: tested on pretraining, SFT and PPO).
Run: `pytest tests/unit/test_grpo.py -q` (`-m "not ray"`: the 10 fast tests, 30-70 s, most of it importing TRL;
the two Ray tests, three fits: 3 min 20 s on 2 cores shared at load 3-9, 9 min 48 s at load 15-28).

How TRL is called: its advantages and its loss are inlined in `GRPOTrainer._generate_and_score_completions` and
`GRPOTrainer._compute_loss`, methods of a trainer that wants a model, a tokenizer, datasets and accelerate. The
tests make the trainer object without its `__init__` (`object.__new__`) and give it only the attributes those two
methods read on the plain path (no vLLM, no tools, no images, one process). Only the steps that need a model are
replaced: `_generate` returns our token ids, and `_get_per_token_logps_and_entropies` returns our log-probabilities.
TRL's own code does the rest: its reward call (`_calculate_rewards`, with our checker as the reward function), the
group mean and std, the clipped surrogate, the KL and the aggregation.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tasks.grpo import GRPOConfig
from tasks.grpo_loss import group_advantages, grpo_loss
from tasks.stage import GptflowError
from tasks.verifiable import VerifiablePrompt, load_prompts, make_prompts, reward

# ---------------------------------------------------------------- the task


def test_checker_scores_the_number_alone():
    p = VerifiablePrompt(question="Which is larger, 3 or 8?", answer=8)
    assert [reward(p, r) for r in ("8", " 8 ", "3", "8.", "eight", "", "88")] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert reward(p, "3", format_reward=0.1) == 0.1 and reward(p, "three", format_reward=0.1) == 0.0
    assert reward(VerifiablePrompt(question="What is 2 - 5?", answer=-3), "-3") == 1.0


@pytest.mark.parametrize("task", ["add", "larger"])
def test_generated_prompts_are_seeded_and_held_out_disjoint(task):
    train, val = make_prompts(task, 9, 20, seed=3)
    assert (train, val) == make_prompts(task, 9, 20, seed=3) and train != make_prompts(task, 9, 20, seed=4)[0]
    assert len(val) == 20 and len(train) + len(val) == (100 if task == "add" else 90)
    assert not {p.question for p in train} & {p.question for p in val}
    for p in train + val:  # every answer is what the question asks
        a, b = (int(t) for t in p.question.replace("?", "").replace(",", "").split() if t.isdigit())
        assert p.answer == (a + b if task == "add" else max(a, b))
    with pytest.raises(GptflowError, match="none to train on"):
        make_prompts("larger", 2, 6, seed=0)


def test_a_prompt_file_without_a_checkable_answer_names_the_record(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"question": "What is 1 + 1?", "answer": 2}\n{"question": "Say hi", "answer": "hi"}\n')
    with pytest.raises(GptflowError, match=r"p\.jsonl: line 2: no checkable answer"):
        load_prompts(f, 1, 0)
    f.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n{"question": "", "answer": 3}\n')
    with pytest.raises(GptflowError, match="line 2: field 'question'"):
        load_prompts(f, 1, 0)
    f.write_text("".join(json.dumps({"question": f"q{i}", "answer": i}) + "\n" for i in range(5)))
    train, val = load_prompts(f, 2, 0)
    assert len(train) == 3 and len(val) == 2 and {p.answer for p in train + val} == set(range(5))


def test_config_refuses_fsdp_and_a_resume_inside_an_iteration_block():
    with pytest.raises(ValueError, match="ddp"):
        GRPOConfig(strategy="fsdp")
    with pytest.raises(ValueError, match="multiple of iterations"):
        GRPOConfig(iterations=4, ckpt_every=10)
    with pytest.raises(ValueError):
        GRPOConfig(group_size=1)


# ---------------------------------------------------------------- the losses against TRL


def _bare_trainer(**attrs):
    """A `GRPOTrainer` without its __init__: the attributes its advantage and loss code read, one process."""
    from trl import GRPOTrainer

    t = object.__new__(GRPOTrainer)
    identity = lambda x, **_: x  # noqa: E731 (one process: gather and reduce return their input)
    defaults = dict(
        accelerator=SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1, gather=identity,
                                    reduce=identity, gather_for_metrics=identity, sync_gradients=True,
                                    is_main_process=True),
        model=SimpleNamespace(training=True, is_gradient_checkpointing=False),
        args=SimpleNamespace(per_device_train_batch_size=8, steps_per_generation=1, gradient_accumulation_steps=1,
                             gradient_checkpointing_kwargs=None, use_bias_correction_kl=False, delta=None,
                             report_to=[]),
        environment_factories=None, environments=None, tools=None, _tokenizer=SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None, mask_truncated_completions=False, num_iterations=1, use_vllm=False,
        multi_objective_aggregation="sum_then_normalize", reward_weights=torch.ones(1), state=SimpleNamespace(global_step=0),
        reward_processing_classes=[None], ref_model=None, log_multimodal=False, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, epsilon_low=0.2, epsilon_high=0.2,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _pending_extra_logs={}, _pending_metrics={},
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list)},
    )
    for k, v in (defaults | attrs).items():
        setattr(t, k, v)
    return t


@pytest.mark.parametrize("scale_rewards", [True, False])
def test_group_advantages_equal_trl_grpo_trainer(scale_rewards):
    """TRL scores 3 prompts x 4 samples with our checker as its reward function and normalises them per group;
    one group all right (std 0: TRL's eps keeps it finite, so does ours)."""
    G, questions = 4, [("Which is larger, 3 or 8?", 8), ("What is 2 + 2?", 4), ("What is 1 + 5?", 6)]
    responses = ["8", "3", " 8", "x", "4", "4", "4", "4", "6", "7", "5", "6"]
    prompts = [VerifiablePrompt(question=q, answer=a) for q, a in questions for _ in range(G)]

    def check(prompts, completions, answer, **_):
        return [reward(VerifiablePrompt(question=p, answer=a), c, 0.1) for p, c, a in zip(prompts, completions, answer, strict=True)]

    trainer = _bare_trainer(num_generations=G, beta=0.0, scale_rewards="group" if scale_rewards else "none",
                            reward_funcs=[check], reward_func_names=["check"])
    trainer._generate = lambda texts: ([[1, 2]] * len(texts), [[5, 6, 7]] * len(texts), None, responses, None, {},
                                       None, None)
    out = trainer._generate_and_score_completions([{"prompt": p.question, "answer": p.answer} for p in prompts])
    rewards = torch.tensor([reward(p, r, 0.1) for p, r in zip(prompts, responses, strict=True)])
    ours = group_advantages(rewards, G, scale=scale_rewards)
    torch.testing.assert_close(ours, out["advantages"], rtol=0, atol=1e-5)
    assert ours[4:8].abs().max() == 0 and ours[:4].abs().max() > 0.5


def _batch(seed: int = 0, N: int = 6, T: int = 7):
    """Log-probabilities of the current, old and reference policies that differ enough to clip, advantages of
    both signs, and a mask of responses of different lengths."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(N, T, generator=g) * 3
    logps = (old + torch.randn(N, T, generator=g) * 0.4).requires_grad_(True)
    ref = old + torch.randn(N, T, generator=g) * 0.3
    adv = torch.randn(N, generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])[:N]
    mask = (torch.arange(T) < lengths[:, None]).float()
    return logps, old, ref, adv, mask


@pytest.mark.parametrize(("aggregation", "loss_type", "beta"),
                         [("sequence", "grpo", 0.04), ("token", "bnpo", 0.04), ("sequence", "grpo", 0.0)])
def test_grpo_loss_equals_trl_compute_loss(aggregation, loss_type, beta):
    """The same per-token log-probabilities through TRL's `_compute_loss` and ours: the loss, its gradient, the
    KL and the clip fraction agree to 1e-5."""
    logps, old, ref, adv, mask = _batch()
    trl_logps = logps.detach().clone().requires_grad_(True)
    trainer = _bare_trainer(loss_type=loss_type, beta=beta)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (trl_logps, torch.zeros_like(trl_logps), None)
    inputs = {"prompt_ids": torch.ones(6, 2, dtype=torch.long), "prompt_mask": torch.ones(6, 2, dtype=torch.long),
              "completion_ids": torch.ones(6, 7, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}
    expected = trainer._compute_loss(None, inputs)
    loss, stats = grpo_loss(logps, old, ref, adv, mask, clip_eps=0.2, beta=beta, aggregation=aggregation)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(logps.grad, trl_logps.grad, rtol=0, atol=1e-5)
    metrics = trainer._metrics["train"]
    assert 0 < stats["clipped"] / stats["tokens"] == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)
    if beta:
        assert (stats["kl"] / stats["tokens"]).item() == pytest.approx(metrics["kl"][0], abs=1e-6)


# ---------------------------------------------------------------- a GRPO run on Ray Train


def _sft_in_process(model, tok, prompts, steps: int, sloppy: float) -> None:
    """Teach the task in a plain torch loop: the right number, followed by a '.' in a `sloppy` share of the
    answers, which the checker does not accept: the greedy answer then has the period, some samples do not."""
    from models.tokens import END, PAD
    from tasks.chat import IGNORE
    from tasks.verifiable import prompt_ids

    end, pad = tok.token_to_id(END), tok.token_to_id(PAD)
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        rows = []
        for i in rng.integers(0, len(prompts), 16):
            answer = str(prompts[i].answer) + ("." if rng.random() < sloppy else "")
            rows.append((prompt_ids(prompts[i], tok), tok.encode(answer, add_special_tokens=False).ids + [end]))
        T = max(len(p) + len(a) for p, a in rows) - 1
        x, y = torch.full((len(rows), T), pad), torch.full((len(rows), T), IGNORE)
        for r, (p, a) in enumerate(rows):
            x[r, : len(p) + len(a) - 1] = torch.tensor((p + a)[:-1])
            y[r, len(p) - 1 : len(p) + len(a) - 1] = torch.tensor(a)
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()


# 2 workers x 2 prompts x 8 samples = 32 samples per step; 20 steps, a checkpoint every 10
RAY_CFG = GRPOConfig(task="larger", max_operand=9, val_prompts=20, steps=20, batch_size=2, group_size=8,
                     num_workers=2, lr=1e-3, log_every=5, eval_every=10, ckpt_every=10, seed=0)


@pytest.fixture(scope="module")
def grpo_run(ray_once, tmp_path_factory):
    """A BPE on the task's texts, a tiny llama-style GPT taught the task sloppily (in process), then GRPO on Ray
    with a sqlite MLflow run."""
    from mlflow.tracking import MlflowClient

    from models.checkpoint import save_model
    from models.gpt import GPT, GPTConfig
    from tasks.bpe import save_tokenizer, train_bpe
    from tasks.grpo import train_grpo
    from tasks.refs import ModelRef, RunLink, ShardsRef, TokenizerRef
    from tasks.tokenizer import TokenizerConfig

    root = tmp_path_factory.mktemp("grpo")
    train, val = make_prompts("larger", 9, 20, seed=0)
    tok = train_bpe(iter([f"{p.question} {p.answer}." for p in train + val] * 5), TokenizerConfig(vocab_size=300),
                    parallel=False)
    save_tokenizer(tok, root / "tok")
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="llama", vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=32, dropout=0.0))
    _sft_in_process(model, tok, train, steps=250, sloppy=0.6)
    save_model(model, root / "sft")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = RunLink(run_id=client.create_run(client.create_experiment("grpo-test")).info.run_id, tracking_uri=uri)
    ref = train_grpo(RAY_CFG, ModelRef(path=str(root / "sft")),
                     TokenizerRef(path=str(root / "tok"), shards=ShardsRef(path="")), root / "out", run)
    return root, ref, run


@pytest.mark.ray
@pytest.mark.slow
def test_grpo_on_ray_raises_held_out_accuracy(grpo_run):
    from mlflow.tracking import MlflowClient

    from models.checkpoint import load_config

    root, ref, run = grpo_run
    m = ref.metrics
    assert m["grpo/val_accuracy_after"] >= m["grpo/val_accuracy_before"] + 0.2, m
    assert m["grpo/val_loss_after"] < m["grpo/val_loss_before"] and m["grpo/final_kl"] < 1.0, m
    history = json.loads((root / "out" / "history.json").read_text())
    assert [s for s, _ in history["val_accuracy"]] == [0, 10, 20]
    rows = history["grpo"]
    assert [r["step"] for r in rows] == [5, 10, 15, 20] and rows[-1]["grpo/reward"] > rows[0]["grpo/reward"], rows
    assert all(0 < r["grpo/response_length"] <= RAY_CFG.max_new_tokens + 1 and r["grpo/rollout_tokens_per_s"] > 0 for r in rows)
    assert ref.counts == {"train_prompts": 70, "train_skipped_too_long": 0, "val_prompts": 20,
                          "val_skipped_too_long": 0, "steps": 20}
    assert load_config(Path(ref.path)) == load_config(root / "sft") and Path(ref.files["grpo_curve"]).stat().st_size > 0
    client = MlflowClient(run.tracking_uri)
    for name in ("grpo/reward", "grpo/accuracy", "grpo/kl", "grpo/clip_fraction", "grpo/response_length"):
        assert [h.step for h in client.get_metric_history(run.run_id, name)] == [5, 10, 15, 20], name
    assert [h.step for h in client.get_metric_history(run.run_id, "val/accuracy")] == [10, 20]


