"""Data stage overhead: our Prefect + MLflow data stage against bare datatrove on the same blocks and inputs.

    python -m bench.data [--inputs PATH ...] [--copies N [N ...]] [--rounds 3] [--prefect-server] [--json FILE] [--keep]

Two ways to run the same pipeline, each in its own Python process, timed from launch to exit:
- ours: `gptflow data` (flows.cli) as a user runs it: Prefect flow and task (on the local Prefect server that
  the CLI starts first thing, `infra/prefect_server.py`), the stage's MLflow run, `crawl_inputs` (listings,
  checks, input hashing), `run_stage` output hashing, `build_corpus` with its per-step counts and invariant
  checks, the funnel chart, samples and the stage's ref logged to MLflow;
- bare: the steps of `plan_runs(cfg, ...)` handed straight to datatrove's `LocalPipelineExecutor`, one run
  after the other: no Prefect, no MLflow, no counting, no chart or samples. It uses the executor settings of
  `tasks.data.execute.execute_run` (tasks, workers, forkserver with the same preloaded imports), so the two
  differ only in what we wrap around datatrove.

Both at each input size of `--copies` (default 1 and 64: the default data config's crawl files read once, and
read 64 times over as copies under other names; the C4 demo text source once), because what we add is mostly a
fixed start-up (Prefect's server, importing Prefect and MLflow) and datatrove's own time grows with the input.
Every run gets a fresh output folder, so nothing is reused or skipped. All runs share one fresh temporary
workspace (GPTFLOW_HOME: Prefect home, MLflow sqlite file, caches); its first `ours` run pays the one-time
Prefect and MLflow database creation, so that run is shown on its own ("cold") and left out of the medians.
Rounds rotate the order of the runs and the median counts, because the 2-core machine is shared.
`--prefect-server` adds a third variant: ours against a `prefect server start` that is already up (started once,
outside the timings, in the same workspace), as `gptflow serve prefect` sets it up for repeated runs.

Prints, for each size: docs in (input records), seconds and documents per second per worker for each variant,
our overhead (our time / bare time - 1; target at most 10%), where the time goes (phases timed inside each
process by wrapping the functions `gptflow data` calls), and the load average. With two sizes or more, it fits
each variant's median seconds as start-up + documents / throughput and prints the start-up we add (seconds)
and our overhead per document (ours seconds per document / bare's - 1).
Asserts nothing about speed; it does check that both runs read and keep the same number of documents.
`--inputs` replaces the crawl files as `gptflow data --input` does.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from infra.env import REPO_ROOT, defaults
from infra.prefect_server import free_port

# ---------------------------------------------------------------------------------------------------------------
# Children: what runs inside the timed processes. Each writes a JSON of wall-clock marks (time.time()).


class Marks:
    """Wall-clock marks and per-function time inside a child, written to a JSON file at exit."""

    def __init__(self, path: Path):
        self.path = path
        self.points: dict[str, float] = {}
        self.spans: dict[str, float] = {}
        self.calls: list[tuple[str, float, float]] = []

    def mark(self, name: str) -> None:
        self.points.setdefault(name, time.time())

    def timed(self, module: Any, name: str, label: str | None = None) -> None:
        """Replace `module.name` by a wrapper that adds its wall time to `spans[label]`; missing names are skipped."""
        fn = getattr(module, name, None)
        if fn is None:
            return
        label = label or name

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spans[label] = self.spans.get(label, 0.0) + time.time() - start
                self.calls.append((label, start, time.time()))

        setattr(module, name, wrapper)

    def write(self) -> None:
        self.path.write_text(json.dumps({"points": self.points, "spans": self.spans, "calls": self.calls}))


def cli_sets(cfg_file: Path) -> list[str]:
    """`--set key=<json>` for each field that differs from the default data config (the tiny preset's).

    Not `--config FILE`: the CLI flattens a config file's nested keys on dots, and text source paths have dots.
    """
    from tasks.data import DataConfig

    full, default = json.loads(cfg_file.read_text()), DataConfig().model_dump(mode="json")
    return [arg for k, v in full.items() if v != default[k] for arg in ("--set", f"{k}={json.dumps(v)}")]


def run_ours(cfg_file: Path, workdir: Path, marks: Marks) -> None:
    """`gptflow data [--set ...] --workdir DIR`, with timers around the pieces we add to datatrove."""
    from flows import cli, presets  # noqa: F401  what `gptflow data` imports to check its config; and then
    from tasks import data, stage
    from tasks.data import execute
    if not os.environ.get("PREFECT_API_URL"):  # it starts its Prefect server, which comes up while it imports
        from infra.prefect_server import local_server

        local_server()
    from flows import stages  # prefect, mlflow and the stage wrappers
    from tasks import tracking

    marks.mark("imported")
    # Each function is wrapped where its caller looks it up: the package's own calls go through `tasks.data`'s
    # and `tasks.data.execute`'s names; the flow's task may hold `crawl_inputs` and `build_corpus` as its own
    # names, so those are wrapped there too (a call goes through one of the two wrappers, never both).
    for module, name in [
        (execute, "execute_run"),
        (execute, "run_counts"),
        (data, "crawl_inputs"),
        (stages, "crawl_inputs"),
        (data, "seed_offline_assets"),
        (data, "warm_up"),
        (data, "plan_runs"),
        (data, "realised_mix"),
        (data, "funnel_chart"),
        (data, "write_samples"),
        (data, "build_corpus"),
        (stages, "build_corpus"),
        (stage, "path_sha256"),
        (tracking, "log_stage"),
    ]:
        marks.timed(module, name)

    root = stages._root

    def flow_started(workdir: str | None) -> str:  # the flow body's first call: Prefect's server is up
        marks.mark("flow_body")
        return root(workdir)

    stages._root = flow_started
    stage_run = tracking.stage_run

    @contextmanager
    def timed_stage_run(*args: Any, **kwargs: Any):
        marks.mark("task_body")
        with stage_run(*args, **kwargs) as run_id:
            marks.mark("mlflow_run_open")
            yield run_id
            marks.mark("task_done")
        marks.mark("mlflow_run_closed")

    tracking.stage_run = timed_stage_run
    rc = cli.run_cli(["data", *cli_sets(cfg_file), "--workdir", str(workdir)])
    marks.mark("cli_done")
    if rc:
        raise SystemExit(rc)


def run_bare(cfg_file: Path, out_dir: Path, marks: Marks) -> None:
    """The same steps, each run on a `LocalPipelineExecutor` with `execute_run`'s settings, nothing else."""
    from infra.env import setup_env

    setup_env()  # the offline switches ours gets from the CLI, before huggingface_hub is imported
    import multiprocess
    from datatrove.executor import LocalPipelineExecutor

    from infra.startup import FORKSERVER_PRELOAD
    from tasks.data import DataConfig
    from tasks.data.execute import WORKER_MODULES, seed_offline_assets
    from tasks.data.inputs import sized_inputs
    from tasks.data.plan import plan_runs

    marks.mark("imported")
    cfg = DataConfig.model_validate_json(cfg_file.read_text())
    seed_offline_assets()  # offline: datatrove would download the LID model and bad-words list otherwise
    runs = plan_runs(cfg, sized_inputs(cfg), out_dir)  # listings expanded and files sized, as the stage does
    marks.mark("planned")
    multiprocess.get_context("forkserver").set_forkserver_preload([*FORKSERVER_PRELOAD, *WORKER_MODULES])
    for run in runs:
        LocalPipelineExecutor(
            pipeline=[step for _, step in run.steps],
            tasks=run.tasks,
            workers=min(cfg.workers, run.tasks),
            logging_dir=str(out_dir / "logs" / run.name),
            skip_completed=True,
            start_method="forkserver",
        ).run()
    marks.mark("runs_done")


def child(kind: str, cfg_file: Path, out: Path, marks_file: Path) -> None:
    marks = Marks(marks_file)
    marks.mark("main")
    try:
        (run_ours if kind == "ours" else run_bare)(cfg_file, out, marks)
    finally:
        marks.write()


# ---------------------------------------------------------------------------------------------------------------
# Parent: launch, time, read back.


def child_env(home: Path) -> dict[str, str]:
    """The workspace defaults of a fresh GPTFLOW_HOME, forced over whatever this shell points at."""
    env = dict(os.environ)
    for key in ("PREFECT_API_URL", "RAY_ADDRESS"):  # the default local set-up: our local Prefect server, local executor
        env.pop(key, None)
    env.update(defaults(home))
    env["GPTFLOW_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def launch(kind: str, cfg_file: Path, out: Path, env: dict[str, str], logs: Path) -> dict[str, Any]:
    """Run one child to completion; return its wall time and marks (seconds from launch)."""
    marks_file = logs / f"{out.name}.marks.json"
    cmd = [sys.executable, "-m", "bench.data", "--child", kind, "--config", str(cfg_file), "--out", str(out),
           "--marks", str(marks_file)]
    with open(logs / f"{out.name}.log", "w") as log:
        start = time.time()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
        seconds = time.time() - start
    if proc.returncode:
        tail = (logs / f"{out.name}.log").read_text()[-3000:]
        raise RuntimeError(f"{kind} run failed (exit {proc.returncode}); log tail:\n{tail}")
    marks = json.loads(marks_file.read_text())
    points = {k: v - start for k, v in marks["points"].items()}
    return {"kind": kind, "seconds": seconds, "points": points, "spans": marks["spans"],
            "calls": [(name, a - start, b - start) for name, a, b in marks["calls"]]}


def stage_folder(kind: str, out: Path) -> Path:
    """Where a run's datatrove output lives: `run_stage` nests ours under <workdir>/data/<key>/."""
    if kind == "bare":
        return out
    (found,) = list((out / "data").glob("*/_SUCCESS"))
    return found.parent


def check_config(kind: str, folder: Path, cfg_file: Path) -> None:
    """Our run must have used exactly the benchmark's config (the CLI starts from the preset and applies --set)."""
    if kind == "ours" and json.loads((folder / "manifest.json").read_text())["params"] != json.loads(cfg_file.read_text()):
        raise RuntimeError(f"gptflow data ran with another config than {cfg_file}; see {folder / 'manifest.json'}")


def docs_in(folder: Path) -> int:
    """Input records of the first run (filter), from datatrove's merged stats file (the readers' "records" count)."""
    total = 0
    for step in json.loads((folder / "logs" / "filter" / "stats.json").read_text()):
        if "READER" in step["name"]:
            value = step["stats"].get("records", step["stats"].get("documents", 0))
            total += value["total"] if isinstance(value, dict) else value
    return int(total)


def docs_out(folder: Path) -> int:
    n = 0
    for path in (folder / "documents").glob("*.jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            n += sum(1 for _ in f)
    return n


# Phases both runs have; the rest are ours only. "exit" (interpreter shut-down) of ours includes stopping our
# local Prefect server and flushing Prefect's logs and events to it.
COMMON = ["python start", "imports", "plan runs + seed assets", "datatrove runs", "exit"]
START_STOP = ["python start", "imports", "stage warm-up (while the server starts)", "flow start (Prefect server)",
              "task start", "MLflow run open", "MLflow run close + flow end", "exit"]


def phases(run: dict[str, Any]) -> dict[str, float]:
    """Split one run's wall time into named phases (seconds) that add up to it."""
    p, s, total = run["points"], run["spans"], run["seconds"]
    if run["kind"] == "bare":
        return {"python start": p["main"], "imports": p["imported"] - p["main"],
                "plan runs + seed assets": p["planned"] - p["imported"],
                "datatrove runs": p["runs_done"] - p["planned"], "exit": total - p["runs_done"]}
    corpus_start, corpus_end = next((a, b) for name, a, b in run["calls"] if name == "build_corpus")
    hashing = [(a, b) for name, a, b in run["calls"] if name == "path_sha256"]
    inputs = [(a, b) for name, a, b in run["calls"] if name == "crawl_inputs"]

    def in_corpus(*names: str) -> float:  # time in these functions called by build_corpus (not by warm_up)
        return sum(b - a for n, a, b in run["calls"] if n in names and a >= corpus_start and b <= corpus_end)

    out = {
        "python start": p["main"],
        "imports": p["imported"] - p["main"],
        "stage warm-up (while the server starts)": s.get("warm_up", 0.0),
        "flow start (Prefect server)": p["flow_body"] - p["imported"] - s.get("warm_up", 0.0),
        "task start": p["task_body"] - p["flow_body"],
        "MLflow run open": p["mlflow_run_open"] - p["task_body"],
        "inputs (listings, checks, hashing)": sum(b - a for a, b in inputs if b <= corpus_start),
        "plan runs + seed assets": in_corpus("seed_offline_assets", "plan_runs"),
        "datatrove runs": s.get("execute_run", 0.0),
        "counting (run_counts)": s.get("run_counts", 0.0),
        "mix (re-reads the output)": s.get("realised_mix", 0.0),
        "funnel chart": s.get("funnel_chart", 0.0),
        "samples": s.get("write_samples", 0.0),
        "output hashing": sum(b - a for a, b in hashing if a >= corpus_end),
        "MLflow logging (log_stage)": s.get("log_stage", 0.0),
    }
    timed = sum(v for k, v in out.items() if k not in START_STOP)
    out["other (config, summary, manifest)"] = (p["task_done"] - p["mlflow_run_open"]) - timed
    out["MLflow run close + flow end"] = p["cli_done"] - p["task_done"]
    out["exit"] = total - p["cli_done"]
    return out


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} cores"


@contextmanager
def prefect_server(env: dict[str, str], logs: Path) -> Iterator[str]:
    """A `prefect server start` on a free local port in the benchmark's workspace; yields its API URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    with open(logs / "prefect_server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"Prefect server did not come up; see {logs / 'prefect_server.log'}") from None
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and the workers it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


VARIANTS = {"bare": "bare datatrove", "ours": "ours (gptflow data)", "ours_server": "ours, Prefect server running"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", nargs="+", metavar="PATH", help="WARC/WET files (replace the bundled crawl)")
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 64], metavar="N",
                    help="input sizes to time, each in every round: N copies of every crawl file (under other "
                         "names), so more records than the samples hold; each copy is extracted and filtered again, "
                         "then dropped by exact dedup (default: 1 64)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds, each one run of every variant (default 3)")
    ap.add_argument("--prefect-server", action="store_true",
                    help="also time ours against a running Prefect server (PREFECT_API_URL), as `gptflow serve prefect` sets up")
    ap.add_argument("--json", type=Path, help="also write the numbers to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workspace and outputs")
    ap.add_argument("--child", choices=["ours", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--marks", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.config, args.out, args.marks)
        return {}

    from tasks.data import DataConfig

    sizes = sorted(set(args.copies))
    if sizes[0] < 1:
        ap.error("--copies: every size is at least 1")
    cfg = DataConfig()
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    home, logs = tmp / "home", tmp / "logs"
    logs.mkdir(parents=True)
    files = {k: sized_config(cfg, args.inputs, k, tmp) for k in sizes}
    env = child_env(home)
    for key in ("PREFECT_HOME", "HF_HOME", "XDG_CACHE_HOME"):  # Prefect warns at import when its home is missing
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    for k, cfg_file in files.items():
        sized = DataConfig.model_validate_json(cfg_file.read_text())
        names = [Path(p).name for p in [*sized.inputs, *sized.text_sources]]
        shown = names if len(names) <= 8 else [*names[:4], f"... {len(names) - 5} more", names[-1]]
        print(f"x{k} inputs ({len(names)} files): {', '.join(shown)}")
    print(f"tasks {cfg.tasks}, workers {cfg.workers}; {load_line()}; workspace {tmp}", flush=True)

    variants = ["bare", "ours"] + ["ours_server"] * args.prefect_server
    try:
        cold = launch("ours", files[sizes[0]], tmp / "ours_cold", env, logs)
        print(f"cold ours run (x{sizes[0]}, fresh workspace: Prefect and MLflow databases created): "
              f"{cold['seconds']:.1f} s", flush=True)
        with prefect_server(env, logs) if args.prefect_server else nullcontext(None) as api_url:
            envs = {"bare": env, "ours": env, "ours_server": env | {"PREFECT_API_URL": api_url or ""}}
            runs: list[dict[str, Any]] = []
            for r in range(args.rounds):
                for k in sizes:
                    for variant in variants[r % len(variants):] + variants[: r % len(variants)]:  # rotate the order
                        kind = "bare" if variant == "bare" else "ours"
                        out = tmp / f"{variant}_x{k}_{r}"
                        run = launch(kind, files[k], out, envs[variant], logs)
                        folder = stage_folder(kind, out)
                        check_config(kind, folder, files[k])
                        run.update(variant=variant, copies=k, round=r, docs_in=docs_in(folder), docs_out=docs_out(folder))
                        runs.append(run)
                        print(f"  round {r + 1} x{k} {VARIANTS[variant]:>28}: {run['seconds']:6.1f} s, "
                              f"{run['docs_in']} docs in, {run['docs_out']} out; {load_line()}", flush=True)
        result = report(cfg, cold, runs, variants, sizes)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def sized_config(cfg: Any, inputs: list[str] | None, copies: int, tmp: Path) -> Path:
    """The benchmark's data config for one size, written to a file: the crawl files (`inputs`, else the default
    config's) read `copies` times over, as copies under other names (copy i of a file is shared by every size)."""
    from infra.env import resolve_path
    from tasks.data import DataConfig

    if inputs or copies > 1:
        paths = [resolve_path(p) for p in (inputs or cfg.inputs)]
        if copies > 1:
            (tmp / "copies").mkdir(exist_ok=True)
            sized = []
            for i in range(1, copies + 1):
                for path in paths:
                    sized.append(tmp / "copies" / f"copy{i}_{path.name}")
                    if not sized[-1].exists():  # not a symlink: input paths are resolved, merging links
                        shutil.copyfile(path, sized[-1])
            paths = sized
        cfg = DataConfig.model_validate(cfg.model_dump() | {"inputs": [str(p) for p in paths]})
    cfg_file = tmp / f"data_config_x{copies}.json"
    cfg_file.write_text(cfg.model_dump_json(indent=2))
    return cfg_file


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope of ys against xs (exact through two points)."""
    if len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError("a line needs at least two different x values")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def scaling(docs: list[int], seconds: dict[str, list[float]], workers: int) -> dict[str, dict[str, float]]:
    """Each variant's median seconds over input sizes fitted as start-up + docs / (rate * workers): the start-up
    (s) and the rate at scale (docs/s/core); for each variant but "bare", both against bare's: the start-up it
    adds (s) and its overhead per document (its seconds per document / bare's - 1)."""
    fits = {v: line_fit([float(d) for d in docs], ts) for v, ts in seconds.items()}
    out = {}
    for v, (start, per_doc) in fits.items():
        out[v] = {"start_up_s": start, "docs_per_s_per_core": 1 / per_doc / workers if per_doc > 0 else float("inf")}
        if v != "bare":
            out[v]["added_start_up_s"] = start - fits["bare"][0]
            out[v]["overhead_per_doc"] = per_doc / fits["bare"][1] - 1
    return out


def report(cfg: Any, cold: dict[str, Any], runs: list[dict[str, Any]], variants: list[str],
           sizes: list[int]) -> dict[str, Any]:
    """Print and return each size's table and phases, then (with two sizes or more) the fit across sizes."""
    result: dict[str, Any] = {"workers": cfg.workers, "tasks": cfg.tasks, "sizes": {}, "cold_seconds": cold["seconds"],
                              "runs": [{k: v for k, v in r.items() if k != "calls"} for r in runs]}
    for k in sizes:
        print(f"\n== x{k} ==")
        result["sizes"][k] = report_size(cfg, [r for r in runs if r["copies"] == k], variants)
    per_size = result["sizes"]
    overheads = ", ".join(f"{100 * per_size[k]['overhead']['ours']:+.0f}% at {per_size[k]['docs_in']:,} docs"
                          for k in sizes)
    print(f"\nour overhead (our time / bare time - 1): {overheads}; target at most +10%")
    if len(sizes) >= 2:
        docs = [per_size[k]["docs_in"] for k in sizes]
        fit = scaling(docs, {v: [per_size[k]["median_seconds"][v] for k in sizes] for v in variants}, cfg.workers)
        result["fit"] = fit
        print(f"fit over the {len(sizes)} sizes (median seconds = start-up + documents / throughput):")
        print(f"  {'':32} {'start-up s':>10} {'docs/s/core':>12} {'added start-up':>15} {'overhead/doc':>13}")
        for v in variants:
            f = fit[v]
            added = (f"{f['added_start_up_s']:+14.1f}s {100 * f['overhead_per_doc']:+12.1f}%" if v != "bare"
                     else f"{'-':>15} {'-':>13}")
            print(f"  {VARIANTS[v]:32} {f['start_up_s']:10.1f} {f['docs_per_s_per_core']:12.2f} {added}")
        print("(the fit is as good as the medians: here a run's time varies by +-2-3 s round to round)")
    print(load_line())
    return result


def report_size(cfg: Any, runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    counts = {(r["docs_in"], r["docs_out"]) for r in runs}
    if len(counts) != 1:
        raise RuntimeError(f"the variants read or kept different numbers of documents: {sorted(counts)}")
    ((n_in, n_out),) = counts
    by = {v: [r for r in runs if r["variant"] == v] for v in variants}
    med = {v: statistics.median(r["seconds"] for r in rs) for v, rs in by.items()}
    rate = {v: n_in / t / cfg.workers for v, t in med.items()}
    overhead = {v: med[v] / med["bare"] - 1 for v in med if v != "bare"}
    print(f"{n_in} documents in, {n_out} out; median of {len(by['bare'])} rounds; {cfg.workers} workers "
          f"({cfg.tasks} tasks) in every variant")
    print(f"  {'':32} {'docs in':>8} {'seconds':>8} {'docs/s/core':>12} {'overhead':>9}")
    for v in variants:
        extra = f"{100 * overhead[v]:+8.0f}%" if v in overhead else f"{'-':>9}"
        print(f"  {VARIANTS[v]:32} {n_in:8d} {med[v]:8.1f} {rate[v]:12.2f} {extra}")

    ph = {v: {name: statistics.median(phases(r)[name] for r in rs) for name in phases(rs[0])} for v, rs in by.items()}
    ours_vs = [v for v in variants if v != "bare"]
    print("where the time goes (median seconds per phase)")
    print(f"  {'phase':38}" + "".join(f" {v:>11}" for v in [*ours_vs, "bare"]))
    for name in ph["ours"]:
        cells = [ph[v][name] for v in ours_vs] + [ph["bare"].get(name)]
        print(f"  {name:38}" + "".join(f" {c:11.2f}" if c is not None else f" {'-':>11}" for c in cells))
    bare_fixed = sum(ph["bare"][k] for k in ("python start", "imports", "exit"))
    bare_core = ph["bare"]["datatrove runs"]
    summary = {}
    for v in ours_vs:
        fixed = sum(ph[v][k] for k in START_STOP)
        data_dependent = sum(t for k, t in ph[v].items() if k not in START_STOP and k not in COMMON)
        share = data_dependent / bare_core
        summary[v] = {"fixed": fixed, "data_dependent": data_dependent, "share": share}
        print(f"{VARIANTS[v]}: start-up and shut-down {fixed:.1f} s (bare {bare_fixed:.1f} s); our work around "
              f"datatrove (hashing, counting, chart, samples, MLflow logging) {data_dependent:.2f} s = "
              f"{100 * share:.1f}% of the bare datatrove runs ({bare_core:.1f} s)")
    return {
        "docs_in": n_in, "docs_out": n_out, "median_seconds": med, "docs_per_s_per_core": rate,
        "overhead": overhead, "phases": ph, "summary": summary, "load": os.getloadavg(), "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    main()
