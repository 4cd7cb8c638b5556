"""infra/screenshots.py without a browser or a server: the page URLs, the Chromium command line, the page text
and the check of what the model-version page must show. The browser itself: tests/e2e/test_browser.py.

    .venv/bin/python -m pytest tests/unit/test_screenshots.py -x -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from infra import screenshots
from infra.screenshots import Version

VERSION = Version(model="gpt-tiny", version="3", aliases=("candidate", "champion"),
                  tags={"eval_status": "passed", "model_sha256": "ab" * 40}, run_id="r1", run_name="registry")


def test_urls_are_the_uis_routes():
    reg, ver = screenshots.mlflow_pages("http://127.0.0.1:5000", "gpt tiny/x", "3")
    assert reg.url == "http://127.0.0.1:5000/#/models/gpt%20tiny%2Fx"
    assert ver.url == "http://127.0.0.1:5000/#/models/gpt%20tiny%2Fx/versions/3"
    dep, run = screenshots.prefect_pages("http://127.0.0.1:4200", "d-1", "f-2")
    assert (dep.url, run.url) == ("http://127.0.0.1:4200/deployments/deployment/d-1",
                                  "http://127.0.0.1:4200/runs/flow-run/f-2")


def test_chromium_runs_headless_in_a_throwaway_profile(monkeypatch):
    monkeypatch.setattr(screenshots, "chromium", lambda: "/usr/bin/chromium")
    shot = screenshots.chromium_argv("http://x/", Path("/tmp/p"), Path("/tmp/a.png"), (800, 600), 5000)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--user-data-dir=/tmp/p",
                 "--virtual-time-budget=5000", "--screenshot=/tmp/a.png", "--window-size=800,600"):
        assert flag in shot
    assert shot[-1] == "http://x/"
    dom = screenshots.chromium_argv("http://x/", Path("/tmp/p"))
    assert "--dump-dom" in dom and not any(a.startswith("--screenshot") for a in dom)


def test_visible_text_drops_markup_and_scripts_and_normalises_spaces():
    html = ("<html><head><style>.a{}</style><script>var x = '@ champion';</script></head><body>"
            "<span>Aliases</span><span>:</span><span>@&nbsp;candidate</span><td>eval_status</td><td>passed</td>")
    assert screenshots.visible_text(html) == "Aliases : @ candidate eval_status passed"


def test_missing_names_what_the_page_does_not_show():
    shown = "Version 3 Source Run : registry Aliases : @ candidate @ champion eval_status passed model_sha256 " + "ab" * 20
    assert screenshots.missing(shown, VERSION) == []  # a long tag value may be cut: its key is enough
    assert screenshots.missing(shown.replace("@ champion", ""), VERSION) == ["@ champion"]
    assert screenshots.missing(shown.replace("passed", "failed"), VERSION) == ["eval_status passed"]
    assert screenshots.missing(shown.replace("Version 3", "Version 31").replace("@ candidate", "@ candidate2"),
                               VERSION) == ["Version 3", "@ candidate"]  # whole words only


def test_no_chromium_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(screenshots.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y chromium"):
        screenshots.chromium()
