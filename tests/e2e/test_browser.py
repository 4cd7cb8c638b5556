"""The browser check: headless Chromium (Debian's `chromium`) opens the MLflow UI's model-version page of a tiny
registered model on a real `gptflow serve mlflow` server (tests/e2e/conftest.py: on PostgreSQL when installed),
and the page's rendered text shows the version, its aliases, its tags and its source run. The code is
infra/screenshots.py, the command that makes the docs' screenshots.

    .venv/bin/python -m pytest tests/e2e/test_browser.py -x -q     # ~40 s alone; skipped without chromium
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

from infra import screenshots

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # slow: an MLflow server and two Chromium page loads


@pytest.fixture(scope="module")
def chromium():
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed: apt-get install -y chromium (.ci/run does it as root)")


def test_model_version_page_shows_aliases_tags_and_source_run(chromium, registered, tmp_path):
    version = screenshots.model_version(registered.url, registered.name)  # the newest version
    assert version.version == str(registered.version) and version.run_id == registered.run_id
    assert set(version.aliases) == {"candidate", "champion"} and version.run_name == "registry"
    page = screenshots.mlflow_pages(registered.url, registered.name, version.version)[1]
    assert page.url.endswith(f"/#/models/{registered.name}/versions/{registered.version}")

    text = screenshots.page_text(page.url, budget_ms=15000)
    assert "@ champion" in text and "@ candidate" in text and "eval_status passed" in text, text[:2000]
    assert screenshots.missing(text, version) == []
    # the check can fail: an alias and a tag value the version does not have are reported
    other = replace(version, aliases=("staging",), tags={"eval_status": "failed"})
    assert screenshots.missing(text, other) == ["@ staging", "eval_status failed"]

    png = screenshots.screenshot(page, tmp_path, budget_ms=15000)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000  # a rendered page, not blank
