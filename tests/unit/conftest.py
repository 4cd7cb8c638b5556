"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infra.env import DATA_DIR


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a busy 2-core machine: spinning OpenMP threads make them ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sqlite_mlflow(tmp_path_factory):
    """A fresh MLflow store (sqlite) for the module's tests, the previous tracking URI restored afterwards."""
    import mlflow

    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield uri
    mlflow.set_tracking_uri(before)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Token shards of the C4 demo sample with a 512-token BPE, built once for the session: the data of the small
    pretraining fits (test_pretrain, test_faults, test_budget)."""
    from tasks.refs import CorpusRef
    from tasks.tokenizer import TokenizerConfig, build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(TokenizerConfig(vocab_size=512), CorpusRef(path=str(DATA_DIR / "text" / "c4_demo.jsonl.gz")), out)
    return out / "shards"


@pytest.fixture(scope="session")
def alpaca_tokenizer(tmp_path_factory) -> Path:
    """A 512-token BPE trained on the messages of the bundled Alpaca sample, built once for the session: the
    tokenizer of the SFT, reward model and PPO tests (test_sft_train, test_reward, test_ppo). Its folder."""
    from tasks.bpe import save_tokenizer, train_bpe
    from tasks.chat import read_sft
    from tasks.tokenizer import TokenizerConfig

    convos = read_sft(DATA_DIR / "sft" / "alpaca_en_demo.json.gz")
    tok = train_bpe(iter(m["content"] for c in convos for m in c), TokenizerConfig(vocab_size=512), parallel=False)
    return save_tokenizer(tok, tmp_path_factory.mktemp("alpaca_tokenizer")).parent
