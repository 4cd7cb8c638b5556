"""SFT on real Ray Train workers: a 2-worker run on the bundled Alpaca sample learns, logs per-step metrics to a
sqlite MLflow run and exports the base model's architecture; a killed run resumes to the same loss curve.
Run: `pytest tests/unit/test_sft_train.py -q` (about 2 minutes: Ray start-up and three fits)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from killing import assert_no_line_repeats as _assert_no_line_repeats
from killing import assert_same_curves, kill_after_checkpoint

from infra.env import DATA_DIR
from models.checkpoint import load_config, load_model, save_model
from models.gpt import GPT, GPTConfig
from tasks.refs import ModelRef, RunLink, ShardsRef, TokenizerRef
from tasks.sft import SFTConfig, finetune_sft

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DATA = DATA_DIR / "sft" / "alpaca_en_demo.json.gz"
# 2 workers x 2 packed windows x 128 tokens = 512 tokens per step; dropout makes the resume depend on each rank's
# RNG; 24 steps with a checkpoint every 4: Ray records a report only when it polls (every 0.2 s, infra.ray_cluster.POLL_S), so a kill after
# the second recorded checkpoint lands seconds before the run's end.
CFG = SFTConfig(sources=str(DATA), max_examples=200, val_fraction=0.1, steps=24, batch_size=2, lr=3e-3,
                warmup_steps=2, log_every=2, eval_every=12, ckpt_every=4, seed=0)


@pytest.fixture(scope="module")
def inputs(alpaca_tokenizer, tmp_path_factory) -> tuple[ModelRef, TokenizerRef]:
    """The session's BPE of the sample's own texts and a random llama-style base model (doc_mask off)."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(arch="llama", vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=32,
                             dropout=0.1)), root / "base")
    return ModelRef(path=str(root / "base")), TokenizerRef(path=str(alpaca_tokenizer), shards=ShardsRef(path=""))


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory) -> RunLink:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("sft-test"))
    return RunLink(run_id=run.info.run_id, tracking_uri=uri)


@pytest.fixture(scope="module")
def reference(inputs, ray_once, mlflow_run, tmp_path_factory) -> tuple[Path, ModelRef]:
    out = tmp_path_factory.mktemp("reference")
    with open(out / "progress.txt", "w") as bar:
        return out, finetune_sft(CFG, *inputs, out, mlflow_run, progress_file=bar)


def test_two_worker_sft_run_learns_logs_and_exports(reference, inputs, mlflow_run):
    from mlflow.tracking import MlflowClient

    out, ref = reference
    history = json.loads((out / "history.json").read_text())
    assert [s for s, _ in history["train"]] == list(range(1, 25))
    assert [s for s, _ in history["val"]] == [0, 12, 24]  # before, mid-run, after
    assert ref.metrics["sft/val_loss_after"] < ref.metrics["sft/val_loss_before"] - 0.5, history["val"]
    assert ref.metrics["sft/val_loss_before"] == history["val"][0][1] and ref.metrics["sft/tokens_per_s"] > 0
    c = ref.counts
    assert c["train"] + c["val"] == c["kept"] and c["train_truncated"] > 0  # Alpaca answers outgrow 128 tokens
    assert c["train_windows"] < c["train"]  # several conversations per window
    assert 0 <= ref.metrics["sft/pad_share"] < ref.metrics["sft/pad_share_one_per_window"]
    assert load_config(Path(ref.path)) == load_config(Path(inputs[0].path))  # the base's config: doc_mask off
    before, after = load_model(Path(inputs[0].path)).state_dict(), load_model(Path(ref.path)).state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in ("wte.weight", "blocks.0.attn.c_attn.weight"))
    client = MlflowClient(mlflow_run.tracking_uri)
    steps = [m.step for m in client.get_metric_history(mlflow_run.run_id, "train/loss")]
    assert steps == list(range(2, 25, 2))
    assert [m.step for m in client.get_metric_history(mlflow_run.run_id, "val/loss")] == [12, 24]
    bar = (out / "progress.txt").read_text()
    assert "sft: 100%" in bar and "24/24" in bar and "loss=" in bar, bar[-500:]
    samples = (out / "samples.md").read_text()  # three held-out prompts in the chat format, answered
    assert samples.count("## Prompt") == 3 and samples.count("<|user|>") >= 3 and samples.count("<|assistant|>") >= 3


def test_fsdp_sft_run_follows_the_ddp_run(reference, inputs, tmp_path):
    """Sharding changes where the state lives, not the arithmetic (the per-token weights included)."""
    finetune_sft(CFG.model_copy(update={"strategy": "fsdp"}), *inputs, tmp_path)
    ddp = json.loads((reference[0] / "history.json").read_text())
    fsdp = json.loads((tmp_path / "history.json").read_text())
    for split in ("train", "val"):
        assert [s for s, _ in fsdp[split]] == [s for s, _ in ddp[split]]
        np.testing.assert_allclose([v for _, v in fsdp[split]], [v for _, v in ddp[split]], rtol=0, atol=1e-4)


_DRIVER = """
import sys
from pathlib import Path
from infra.env import setup_env
setup_env()
from tasks.refs import ModelRef, ShardsRef, TokenizerRef
from tasks.sft import SFTConfig, finetune_sft
finetune_sft(SFTConfig.model_validate_json(sys.argv[1]), ModelRef(path=sys.argv[2]),
             TokenizerRef(path=sys.argv[3], shards=ShardsRef(path="")), Path(sys.argv[4]))
"""





def test_killed_sft_run_resumes_to_the_same_loss_curve(reference, inputs, tmp_path):
    base, tok = inputs
    out = tmp_path / "stage"
    log = tmp_path / "killed_run.log"
    killed_at = kill_after_checkpoint(_DRIVER, [CFG.model_dump_json(), base.path, tok.path, str(out)],
                                      out / "ray" / "sft", 2 * CFG.ckpt_every, log)
    assert killed_at < CFG.steps and not (out / "model").exists(), "the kill came too late to test a resume"
    _assert_no_line_repeats(log.read_text())

    finetune_sft(CFG, base, tok, out)  # the rerun: same folder, same RunConfig(name, storage_path)

    history = assert_same_curves(out, reference[0])
    assert history["resumes"] == [killed_at]


def test_lora_sft_trains_only_adapters_and_saves_them_merged(inputs, ray_once, tmp_path):
    """SFT with `lora`: the workers train the adapters alone; `adapters/` holds them on their own, `model/` is a
    plain model with them merged (its logits equal base + adapters), and the frozen base weights did not move."""
    from models.lora import LoraOptions, load_adapters

    base, tok = inputs
    cfg = CFG.model_copy(update={"steps": 6, "ckpt_every": 6, "eval_every": 6, "num_workers": 1,
                                 "lora": LoraOptions(rank=4, alpha=8)})
    ref = finetune_sft(cfg, base, tok, tmp_path)
    assert ref.metrics["sft/val_loss_after"] < ref.metrics["sft/val_loss_before"]
    merged, plain_base = load_model(Path(ref.path)), load_model(Path(base.path))
    with_adapters = load_adapters(load_model(Path(base.path)), tmp_path / "adapters")
    idx = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    for m in (merged, plain_base, with_adapters):
        m.eval()
    with torch.no_grad():
        assert torch.allclose(merged(idx)[0], with_adapters(idx)[0], atol=1e-5)
        assert not torch.allclose(merged(idx)[0], plain_base(idx)[0], atol=1e-3)  # the adapters learned something
    # only the adapted linear layers changed: embeddings and norms are the base's, bit for bit
    for name, p in plain_base.state_dict().items():
        if "norm" in name or "ln_" in name or name.startswith("wte"):
            assert torch.equal(p, merged.state_dict()[name]), name
