"""GRPO: the checker and the prompt generator, our advantages and loss against TRL 1.16's `GRPOTrainer` on the
same batch, and one 2-worker Ray run that raises held-out accuracy on its task.
Run: `pytest tests/unit/test_grpo.py -q` (the Ray run: about a minute; `-m "not ray"` skips it).

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
from types import SimpleNamespace

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
