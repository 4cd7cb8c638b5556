"""Screenshots of the Prefect and MLflow UIs, and a check that the registry page shows what it must.

    python -m infra.screenshots --prefect-url http://127.0.0.1:4200 --mlflow-url http://127.0.0.1:5000 \\
        --model gpt-tiny --out docs/img/ui

Opens, in Debian's headless Chromium (`apt-get install -y chromium`; no browser is downloaded), the Prefect UI's
deployment page and latest flow-run page and the MLflow UI's registered-model page and model-version page (the
newest version unless `--version`), saves one PNG per page under `--out`, and reads the model-version page's
rendered text (`--dump-dom`) to check that the version, its aliases, its tags and its source run are visible.
Prints one line per page and exits 1 naming what was not visible. The IDs come from the servers' REST APIs, so
rerunning it after a new pipeline run shoots the new run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


@dataclass(frozen=True)
class Page:
    name: str  # the PNG's file name, without .png
    url: str


@dataclass(frozen=True)
class Version:
    """What the model-version page must show."""

    model: str
    version: str
    aliases: tuple[str, ...]
    tags: dict[str, str]
    run_id: str
    run_name: str

    def expected(self) -> list[str]:
        """Strings the rendered page's text (`visible_text`) must contain: the version, each alias as MLflow shows
        it (`@ name`), each tag (its key, and its value beside it when short enough to show whole) and the source
        run (its name, the link to the run that logged the model)."""
        tags = [f"{k} {v}" if len(v) <= 40 else k for k, v in self.tags.items()]
        return [f"Version {self.version}", *(f"@ {a}" for a in self.aliases), *tags,
                f"Source Run : {self.run_name or self.run_id}"]


# ---------------------------------------------------------------------------------------------- URLs


def mlflow_pages(mlflow_url: str, model: str, version: str) -> list[Page]:
    """MLflow's UI routes are hash routes (the single-page app's router)."""
    quoted = urllib.parse.quote(model, safe="")
    return [Page("mlflow-registered-model", f"{mlflow_url}/#/models/{quoted}"),
            Page("mlflow-model-version", f"{mlflow_url}/#/models/{quoted}/versions/{version}")]


def prefect_pages(prefect_url: str, deployment_id: str, flow_run_id: str) -> list[Page]:
    return [Page("prefect-deployment", f"{prefect_url}/deployments/deployment/{deployment_id}"),
            Page("prefect-flow-run", f"{prefect_url}/runs/flow-run/{flow_run_id}")]


# ---------------------------------------------------------------------------------------------- REST look-ups


def _call(url: str, body: dict | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def model_version(mlflow_url: str, model: str, version: str | None = None) -> Version:
    """The version's aliases, tags and source run, from MLflow's REST API (infra/ does not import mlflow)."""
    api = f"{mlflow_url}/api/2.0/mlflow"
    q = urllib.parse.quote
    if version is None:
        where = q(f"name='{model}'")
        found = _call(f"{api}/model-versions/search?filter={where}&max_results=1000")
        numbers = [int(v["version"]) for v in found.get("model_versions", [])]
        if not numbers:
            raise ValueError(f"registered model '{model}' has no versions at {mlflow_url}")
        version = str(max(numbers))
    v = _call(f"{api}/model-versions/get?name={q(model)}&version={q(version)}")["model_version"]
    run_name = ""
    if v.get("run_id"):
        run_name = _call(f"{api}/runs/get?run_id={q(v['run_id'])}")["run"]["info"].get("run_name", "")
    return Version(model=model, version=version, aliases=tuple(v.get("aliases", [])),
                   tags={t["key"]: t["value"] for t in v.get("tags", [])}, run_id=v.get("run_id", ""),
                   run_name=run_name)


def latest_prefect_ids(prefect_url: str, deployment: str | None = None) -> tuple[str, str]:
    """(deployment id, flow-run id): the newest flow run that has a deployment (of `deployment`, `flow/name`,
    when given); ValueError when there is none."""
    api = f"{prefect_url}/api"
    body: dict = {"sort": "START_TIME_DESC", "limit": 50}
    runs = [r for r in _call(f"{api}/flow_runs/filter", body) if r.get("deployment_id")]
    if deployment:
        flow, name = deployment.split("/", 1)
        wanted = _call(f"{api}/deployments/name/{urllib.parse.quote(flow)}/{urllib.parse.quote(name)}")["id"]
        runs = [r for r in runs if r["deployment_id"] == wanted]
    if not runs:
        raise ValueError(f"no flow run of {'deployment ' + deployment if deployment else 'a deployment'} "
                         f"at {prefect_url}: trigger one first")
    return runs[0]["deployment_id"], runs[0]["id"]


# ---------------------------------------------------------------------------------------------- Chromium


def chromium() -> str:
    """Debian's Chromium; a clear error when it is missing (never a download)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise FileNotFoundError("chromium is not installed: apt-get install -y chromium")
    return found


def chromium_argv(url: str, profile: Path, screenshot: Path | None = None, size: tuple[int, int] = (1400, 1000),
                  budget_ms: int = 20000) -> list[str]:
    """One headless Chromium call: `--screenshot` to a PNG, or `--dump-dom` to stdout when no PNG is given.
    `--virtual-time-budget` lets the single-page apps fetch and render before the shot."""
    what = [f"--screenshot={screenshot}", f"--window-size={size[0]},{size[1]}"] if screenshot else ["--dump-dom"]
    return [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
            *what, url]


def run_chromium(argv: list[str], profile: Path, timeout: float = 120) -> str:
    """Run one Chromium call with its home in `profile` too: Chromium's crash reporter writes under
    ~/.config whatever --user-data-dir says, and nothing may land in the user's home folder."""
    env = {**os.environ, "HOME": str(profile), "XDG_CONFIG_HOME": str(profile / "config"),
           "XDG_CACHE_HOME": str(profile / "cache")}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"chromium failed on {argv[-1]} (status {out.returncode}): {out.stderr.strip()[-500:]}")
    return out.stdout


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.parts.append(" ".join(data.split()))  # MLflow writes `@&nbsp;alias`: any whitespace is one space


def visible_text(html: str) -> str:
    """The page's text, tags, scripts and styles removed, one plain space between pieces and words."""
    parser = _Text()
    parser.feed(html)
    return " ".join(parser.parts)


def page_text(url: str, budget_ms: int = 20000) -> str:
    with tempfile.TemporaryDirectory(prefix="gptflow-chromium-") as profile:
        return visible_text(run_chromium(chromium_argv(url, Path(profile), budget_ms=budget_ms), Path(profile)))


def screenshot(page: Page, out_dir: Path, size: tuple[int, int] = (1400, 1000), budget_ms: int = 20000) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{page.name}.png"
    with tempfile.TemporaryDirectory(prefix="gptflow-chromium-") as profile:
        run_chromium(chromium_argv(page.url, Path(profile), png, size, budget_ms), Path(profile))
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot for {page.url} ({png})")
    return png


def missing(text: str, version: Version) -> list[str]:
    """The expected strings of `version` that `text` does not contain as whole words (`Version 3` is not found
    in `Version 31`, nor `@ candidate` in `@ candidate2`)."""
    return [s for s in version.expected() if not re.search(rf"(?<!\S){re.escape(s)}(?!\S)", text)]


# ---------------------------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.screenshots", description=__doc__.split("\n\n")[0])
    p.add_argument("--mlflow-url", required=True, help="the MLflow server, e.g. http://127.0.0.1:5000")
    p.add_argument("--model", required=True, help="the registered model, e.g. gpt-tiny")
    p.add_argument("--version", help="the model version to show (default: the newest)")
    p.add_argument("--prefect-url", help="the Prefect server, e.g. http://127.0.0.1:4200 (omit: MLflow pages only)")
    p.add_argument("--deployment", help="flow/deployment whose newest run to show (default: any deployment's)")
    p.add_argument("--out", type=Path, default=Path("docs/img/ui"), help="where the PNGs go")
    p.add_argument("--budget-ms", type=int, default=20000, help="virtual time each page gets to load and render")
    args = p.parse_args(argv)
    mlflow_url, prefect_url = args.mlflow_url.rstrip("/"), (args.prefect_url or "").rstrip("/")

    version = model_version(mlflow_url, args.model, args.version)
    pages = mlflow_pages(mlflow_url, args.model, version.version)
    if prefect_url:
        pages += prefect_pages(prefect_url, *latest_prefect_ids(prefect_url, args.deployment))
    for page in pages:
        print(f"{page.name}: {screenshot(page, args.out, budget_ms=args.budget_ms)}  ({page.url})")
    absent = missing(page_text(pages[1].url, args.budget_ms), version)
    if absent:
        print(f"not visible on {pages[1].url}: {', '.join(absent)}", file=sys.stderr)
        return 1
    print(f"{args.model} version {version.version}: aliases {', '.join(version.aliases) or 'none'}, "
          f"{len(version.tags)} tags and source run {version.run_name or version.run_id} visible")
    return 0


if __name__ == "__main__":
    sys.exit(main())
