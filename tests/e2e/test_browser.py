"""The browser check: headless Chromium (Debian's `chromium`) opens the MLflow UI's model-version page of a
registered tiny model on a real `gptflow serve mlflow` server, and the page's rendered text shows the version, its
aliases, its tags and its source run (infra/screenshots.py; the docs' screenshots come from the same command).

    .venv/bin/python -m pytest tests/e2e/test_browser.py -x -q     # ~40 s; skipped without chromium
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import replace

import pytest

from infra import screenshots, services

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # slow: an MLflow server and two Chromium page loads (~40 s)
MODEL = "gpt-browser-test"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny GPT registered as MODEL on a fresh MLflow server (sqlite), aliases candidate and champion, a tag."""
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed: apt-get install -y chromium (.ci/run does it as root)")
    import mlflow

    from models.checkpoint import save_model
    from models.config import GPTConfig
    from models.gpt import GPT
    from tasks import tracking
    from tasks.bpe import train_bpe
    from tasks.refs import ModelRef, TokenizerRef
    from tasks.registry import RegistryConfig
    from tasks.tokenizer import TokenizerConfig

    home = tmp_path_factory.mktemp("browser")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    state = services.start("mlflow", port=port, home=home, timeout=120)
    before = mlflow.get_tracking_uri()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", state.url)
            mlflow.set_tracking_uri(state.url)
            tok = train_bpe(iter(["a tiny corpus for a tiny tokenizer"] * 20), TokenizerConfig(vocab_size=280))
            folder = save_model(GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=32, n_layer=2,
                                              n_head=2, n_embd=32)), home / "model")
            tok.save(str(folder / "tokenizer.json"))
            with tracking.stage_run("registry", None) as run_id:
                reg = tracking.register_model(run_id, ModelRef(path=str(folder)), TokenizerRef(path=str(folder)),
                                              RegistryConfig(model_name=MODEL), {"preset": "tiny"})
                tracking.record_gate(MODEL, reg.version, ["candidate"], "champion", True, {"eval_status": "passed"},
                                     "a tiny model for the browser check")
        yield state.url
    finally:
        mlflow.set_tracking_uri(before)
        services.stop("mlflow", home)


def test_model_version_page_shows_aliases_tags_and_source_run(registered, tmp_path):
    version = screenshots.model_version(registered, MODEL)
    assert set(version.aliases) == {"candidate", "champion"} and version.run_name == "registry"
    page = screenshots.mlflow_pages(registered, MODEL, version.version)[1]
    assert page.url.endswith(f"/#/models/{MODEL}/versions/{version.version}")

    text = screenshots.page_text(page.url, budget_ms=15000)
    assert "@ champion" in text and "@ candidate" in text and "eval_status passed" in text, text[:2000]
    assert screenshots.missing(text, version) == []
    # the check can fail: an alias and a tag the version does not have are reported
    other = replace(version, aliases=("staging",), tags={"eval_status": "failed"})
    assert screenshots.missing(text, other) == ["@ staging", "eval_status failed"]

    png = screenshots.screenshot(page, tmp_path, budget_ms=15000)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000  # a rendered page, not blank
