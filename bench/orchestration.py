"""Orchestration benchmark: what the machinery around the stages costs, apart from their compute.

Measures and prints, asserts nothing:
  (a) starting a local Ray (`infra.ray_cluster.ray_init`), once;
  (b) a Ray Train fit whose loop does nothing (`TorchTrainer` with N workers, the pattern of the pretraining and
      SFT stages), repeated: the controller and worker processes, their imports, the gloo process group; what
      every training stage pays before its first step, on a Ray that is already up; alternating with the same fit
      with its controller in Ray's actor (ours runs it in the driver, `infra.ray_local`), and in the actor on
      Ray's own `TorchConfig` (ours: `infra.ray_torch`); then one more, with the CPU seconds of each process
      it started (Linux /proc, sampled every 0.1 s) against the machine's busy CPU time; and the same fit on the
      workers that the fit before it left (`infra.ray_local.warm_workers`, as in the pipeline);
  (b2) a fit whose workers report 6 checkpoints 0.3 s apart and then run ~3 s of matmuls with no report, in a
      fresh Ray each time, with Ray Train's poll of its workers at its default 2 s, at 0.5 s and at ours
      (`infra.ray_cluster.POLL_S`), alternating: how long the reports and the fit's end wait on the poll, and
      whether polling more often slows the compute;
  (c) with `--pipeline`, the tiny pipeline's own stage times (`gptflow run --preset tiny` on a fresh workspace):
      wall time, the stages' sum and the share of orchestration: Prefect and MLflow outside the stages, Ray's
      start, and each Ray Train stage's own fit start-up and end as the stage measured them (`FitClock`: from
      `fit()` to rank 0's loop, which includes importing the stage's modules, and from the loop's end back);
      beside it the earlier estimate, with (b) once per Ray Train stage, and a stricter split, in which only
      the stages' pure cores count as compute (the rest of a stage, its Prefect task, MLflow run and stage
      cache, is orchestration too);
  (c2) with `--pairs N`, and nothing else: N pairs of tiny pipelines, alternating, split as (c): with
      `--switch keep` (the default), every fit on the workers the fit before it left (ours) and on new workers
      (`GPTFLOW_KEEP_WORKERS=0`); with `--switch controller`, every fit's controller in the driver (ours) and in
      Ray's actor (`GPTFLOW_TRAIN_CONTROLLER=actor`); and whether every run gave the same eval table.

Run: `python -m bench.orchestration [--workers 2] [--repeats 2] [--pipeline]` (~2 min; --pipeline ~5 min more).
`python -m bench.orchestration --pairs 2 [--switch keep|controller]` (~8 min).
"""

from __future__ import annotations

from infra.env import setup_env

setup_env()  # before anything imports ray

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402


def _empty_loop(config: dict) -> None:
    """A worker that does nothing: the fit's cost is all start-up and tear-down."""


@contextmanager
def setting(var: str, value: str) -> Iterator[None]:
    """The environment variable `var` is `value` in this block (and in pipelines started in it)."""
    before = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[var]
        else:
            os.environ[var] = before


def controller(where: str) -> Any:
    """Fits in this block, and pipelines started in it, run their controller in the `driver` or Ray's `actor`."""
    from infra.ray_local import CONTROLLER_ENV

    return setting(CONTROLLER_ENV, where)


def empty_fit(workers: int, ray_backend: bool = False, actor: bool = False) -> float:
    """One empty fit; with `ray_backend`, on Ray's own `TorchConfig` instead of ours (`infra.ray_torch`); with
    `actor`, its controller in Ray's actor instead of the driver (`infra.ray_local`)."""
    from ray.train import RunConfig, ScalingConfig

    from infra.ray_cluster import torch_trainer

    extra = {}
    if ray_backend:
        from ray.train.torch import TorchConfig

        extra["torch_config"] = TorchConfig()
    start = time.perf_counter()
    with controller("actor" if actor else "driver"), tempfile.TemporaryDirectory() as storage:
        torch_trainer(_empty_loop, scaling_config=ScalingConfig(num_workers=workers),
                      run_config=RunConfig(name="empty", storage_path=storage), **extra).fit()
    return time.perf_counter() - start


def _proc_cpu() -> dict[str, tuple[float, str]]:
    """pid -> (CPU seconds so far, process title) of every process this user can read (Linux /proc)."""
    hz, found = os.sysconf("SC_CLK_TCK"), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                title = fh.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        found[pid] = ((int(fields[11]) + int(fields[12])) / hz, title)
    return found


def _busy_cpu() -> tuple[float, float]:
    """The machine's busy and total CPU seconds so far, all cores (/proc/stat)."""
    with open("/proc/stat") as fh:
        ticks = [int(v) for v in fh.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz


def empty_fit_cpu(workers: int) -> dict[str, Any]:
    """(b), once more, sampled: CPU seconds by the processes the fit started (by Ray's process title)."""
    import threading

    before, samples, done = _proc_cpu(), {}, threading.Event()

    names: dict[str, str] = {}  # pid -> the actor class it became ("ray::IDLE" first; "ray::execute.fn" in tasks)

    def sample() -> None:
        while not done.is_set():
            now = _proc_cpu()
            samples.update(now)  # a process's last sample before it exits
            for pid, (_, title) in now.items():
                name = title.split(".")[0].removeprefix("ray::")  # "ray::TrainController.run" while in a method
                if pid not in names and title.startswith("ray::") and name not in ("IDLE", "execute"):
                    names[pid] = name
            done.wait(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    busy0, total0 = _busy_cpu()
    thread.start()
    wall = empty_fit(workers)
    done.set()
    thread.join()
    busy1, total1 = _busy_cpu()
    by_title: dict[str, float] = {}
    for pid, (cpu, _) in samples.items():
        if pid not in before and pid in names:
            by_title[names[pid]] = by_title.get(names[pid], 0.0) + cpu
    return {"wall_s": wall, "busy_cpu_s": busy1 - busy0, "cpu_s": total1 - total0, "new_processes": by_title}


def _reporting_loop(config: dict) -> None:
    """Six quick steps, each ending in a report with a checkpoint, as a fit with frequent checkpoints does; then a
    fixed amount of matmuls with no report, which the controller's polls can only slow down."""
    import ray.train
    import torch

    start = time.time()
    for i in range(6):
        time.sleep(0.3)
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "state"), "w") as fh:
                fh.write(str(i))
            ray.train.report({"i": i}, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=f"c{i}")
    stop = time.time()
    a = torch.randn(256, 256)
    for _ in range(12000):  # ~3 s on one thread
        a = torch.tanh(a @ a)
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["out"], "w") as fh:
            json.dump([start, stop, time.time()], fh)


def reporting_fit(workers: int) -> dict[str, float]:
    """(b2) in this process: a fresh Ray, one fit of `_reporting_loop`; its loop's and its end's seconds."""
    from ray.train import RunConfig, ScalingConfig

    from infra.ray_cluster import ray_init, torch_trainer

    ray_init()
    with tempfile.TemporaryDirectory() as storage:
        out = os.path.join(storage, "times.json")
        torch_trainer(_reporting_loop, train_loop_config={"out": out}, scaling_config=ScalingConfig(num_workers=workers),
                      run_config=RunConfig(name="reports", storage_path=storage)).fit()
        end = time.time()
        with open(out) as fh:
            start, stop, computed = json.load(fh)
    return {"loop_s": stop - start, "compute_s": computed - stop, "end_s": end - computed}


def reporting_fits(workers: int, repeats: int) -> dict[str, list[dict[str, float]]]:
    """(b2) at Ray's default poll, at our earlier 0.5 s and at ours, alternating, each in a fresh process and
    workspace."""
    from infra.ray_cluster import POLL_ENV, POLL_S

    found: dict[str, list[dict[str, float]]] = {"2.0": [], "0.5": [], POLL_S: []}
    for _ in range(repeats):
        for poll in found:
            with tempfile.TemporaryDirectory(prefix="gptflow-bench-") as home:
                env = {**os.environ, "GPTFLOW_HOME": home, POLL_ENV: poll}
                out = subprocess.run([sys.executable, "-m", "bench.orchestration", "--reporting-fit",
                                      "--workers", str(workers)], env=env, check=True, capture_output=True, text=True)
            found[poll].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return found


def pipeline_times() -> tuple[float, dict[str, Any]]:
    """Wall time and the `--result-json` of `gptflow run --preset tiny` on a fresh workspace."""
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "GPTFLOW_HOME": home}
        env.pop("MLFLOW_TRACKING_URI", None)
        result = os.path.join(home, "result.json")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--result-json", result],
                       env=env, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        with open(result) as fh:
            out = json.load(fh)
    return wall, out


def split(wall: float, out: dict[str, Any]) -> dict[str, float]:
    """A pipeline run's wall time split: orchestration = outside the stages + Ray's start + each Ray Train stage's
    fit start-up and end (measured in the stage: from fit() to rank 0's loop, and from the loop's end back); the
    stricter split also counts a stage's time less its pure core's (its Prefect task, its MLflow run and logging,
    the stage cache's hashes and manifest) and registering and the gate."""
    times, clocks = out["times"], out["fit_clocks"]
    outside, ray_start = wall - times["total"], times.get("ray_start", 0.0)
    in_fits = sum(c["fit_startup_seconds"] + c["fit_end_seconds"] for c in clocks.values())
    overhead = outside + ray_start + in_fits
    cores = sum(out["core_seconds"].values())
    strict = wall - (cores - in_fits)
    return {"wall_s": wall, "outside_s": outside, "ray_start_s": ray_start, "in_fits_s": in_fits,
            "orchestration_s": overhead, "share": overhead / wall, "cores_s": cores, "strict_s": strict,
            "strict_share": strict / wall}


SWITCHES = {  # (c2): the two arms of each pair, as (name, environment variable, value); ours first
    "keep": (("kept", "GPTFLOW_KEEP_WORKERS", "1"), ("new", "GPTFLOW_KEEP_WORKERS", "0")),
    "controller": (("driver", "GPTFLOW_TRAIN_CONTROLLER", "driver"), ("actor", "GPTFLOW_TRAIN_CONTROLLER", "actor")),
}
ARM_TEXT = {"kept": "fits on the workers the fit before left", "new": "fits on new workers",
            "driver": "controller in the driver", "actor": "controller in Ray's actor"}


def pipeline_pairs(pairs: int, switch: str = "keep") -> dict[str, Any]:
    """(c2) The tiny pipeline with the two arms of `switch`, alternating (the first of each pair swaps), split as
    (c); and whether every run's eval table was the same."""
    arms = SWITCHES[switch]
    found: dict[str, Any] = {name: [] for name, _, _ in arms}
    tables = set()
    for i in range(pairs):
        for name, var, value in (arms if i % 2 == 0 else arms[::-1]):
            with setting(var, value):
                wall, out = pipeline_times()
            part = split(wall, out)
            tables.add(out["eval_table"])
            found[name].append(part)
            print(f"(c2) {ARM_TEXT[name]}: wall {part['wall_s']:.1f} s, fits' start-up + end {part['in_fits_s']:.1f} s, "
                  f"orchestration {part['share']:.0%} (stricter {part['strict_share']:.0%})", flush=True)
    for name, parts in found.items():
        print(f"(c2) {ARM_TEXT[name]}, medians of {pairs}: wall {statistics.median(p['wall_s'] for p in parts):.1f} s, "
              f"fits' start-up + end {statistics.median(p['in_fits_s'] for p in parts):.1f} s, orchestration "
              f"{statistics.median(p['share'] for p in parts):.0%} (stricter "
              f"{statistics.median(p['strict_share'] for p in parts):.0%})")
    print(f"(c2) the same eval table in all {2 * pairs} runs: {'yes' if len(tables) == 1 else 'no'}")
    return found | {"same_eval_table": len(tables) == 1}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--pipeline", action="store_true", help="also run the tiny pipeline and split its wall time")
    p.add_argument("--pairs", type=int, default=0, metavar="N",
                   help="only (c2): N pairs of tiny pipelines, one arm of --switch and the other, alternating")
    p.add_argument("--switch", choices=sorted(SWITCHES), default="keep",
                   help="(c2): kept workers against new ones per fit, or the controller in the driver against Ray's actor")
    p.add_argument("--reporting-fit", action="store_true", help=argparse.SUPPRESS)  # (b2)'s child process
    args = p.parse_args(argv)
    if args.reporting_fit:
        print(json.dumps(reporting_fit(args.workers)))
        return
    if args.pairs:
        print(json.dumps(pipeline_pairs(args.pairs, args.switch)))
        return
    from infra.ray_cluster import ray_init

    start = time.perf_counter()
    ray_init()
    ray_start = time.perf_counter() - start
    first = empty_fit(args.workers)  # the first on this Ray: cold caches (and, on Ray's policy, its coordinator)
    fits, ray_fits, actor_fits = [], [], []
    for _ in range(args.repeats):  # alternating
        fits.append(empty_fit(args.workers))
        actor_fits.append(empty_fit(args.workers, actor=True))
        ray_fits.append(empty_fit(args.workers, ray_backend=True, actor=True))
    fit = min(fits)
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"(a) Ray start: {ray_start:.1f} s; the first empty fit on it {first:.1f} s")
    print(f"(b) empty Ray Train fit, {args.workers} workers: " + ", ".join(f"{s:.1f}" for s in fits) + " s; with "
          "its controller in Ray's actor (as on a cluster), not the driver: " + ", ".join(f"{s:.1f}" for s in actor_fits)
          + f" s (median {statistics.median(actor_fits) / statistics.median(fits):.2f}x); in the actor and on Ray's own "
          "TorchConfig, whose controller imports torch: " + ", ".join(f"{s:.1f}" for s in ray_fits)
          + f" s (median {statistics.median(ray_fits) / statistics.median(actor_fits):.2f}x our backend's)")
    result = {"ray_start_s": ray_start, "first_fit_s": first, "empty_fit_s": fits, "empty_fit_ray_backend_s": ray_fits,
              "empty_fit_actor_controller_s": actor_fits}
    from infra.ray_local import warm_workers

    with warm_workers():
        empty_fit(args.workers)  # starts the workers that the next fits take over
        kept = [empty_fit(args.workers) for _ in range(args.repeats)]
    print("    on the workers the fit before left (warm_workers, as in the pipeline): " + ", ".join(f"{s:.2f}" for s in kept)
          + f" s ({statistics.median(fits) / statistics.median(kept):.0f}x faster than on new workers)")
    result["empty_fit_kept_workers_s"] = kept
    if os.path.exists("/proc/stat"):
        cpu = empty_fit_cpu(args.workers)
        print(f"    once more, sampled: {cpu['wall_s']:.1f} s wall; the machine busy {cpu['busy_cpu_s']:.1f} of "
              f"{cpu['cpu_s']:.1f} CPU-s ({cpu['busy_cpu_s'] / cpu['cpu_s']:.0%}); CPU-s of the processes it started: "
              + ", ".join(f"{t.removeprefix('ray::')} {c:.1f}" for t, c in sorted(cpu["new_processes"].items(),
                                                                                 key=lambda kv: -kv[1])))
        result["empty_fit_cpu"] = cpu
    import ray

    ray.shutdown()  # (b2) and (c) start their own
    reports = reporting_fits(args.workers, args.repeats)
    for poll, runs in reports.items():
        print(f"(b2) Ray Train polling every {poll} s: 6 reports 0.3 s apart "
              + ", ".join(f"{r['loop_s']:.2f}" for r in runs) + " s (1.8 s of it the steps); the matmuls "
              + ", ".join(f"{r['compute_s']:.2f}" for r in runs) + " s; the fit's end after the loop "
              + ", ".join(f"{r['end_s']:.2f}" for r in runs) + " s")
    result["reporting_fit"] = reports
    if args.pipeline:
        wall, out = pipeline_times()
        part = split(wall, out)
        times, clocks = out["times"], out["fit_clocks"]
        estimate = part["outside_s"] + part["ray_start_s"] + fit * len(clocks)  # the empty fit (b) for each stage's own
        print(f"(c) tiny pipeline: wall {wall:.1f} s, stages {times['total']:.1f} s; outside the stages "
              f"{part['outside_s']:.1f} s, Ray start {part['ray_start_s']:.1f} s, the Ray Train fits' start-up and end "
              f"{part['in_fits_s']:.1f} s ("
              + ", ".join(f"{s} {c['fit_startup_seconds']:.1f} + {c['fit_end_seconds']:.1f}" for s, c in clocks.items())
              + ")")
        print(f"    orchestration {part['orchestration_s']:.0f} s of {wall:.0f} s: {part['share']:.0%}; stage compute "
              f"{wall - part['orchestration_s']:.0f} s (with the empty fit (b) x {len(clocks)} in place of the fits' "
              f"own: ~{estimate / wall:.0%})")
        print("    " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
        print(f"    stricter, with only the stages' pure cores (less their fits' start-up and end) as compute: cores "
              f"{part['cores_s']:.1f} s, orchestration {part['strict_s']:.0f} s of {wall:.0f} s: {part['strict_share']:.0%}")
        result |= {"pipeline_wall_s": wall, "pipeline_times": times, "fit_clocks": clocks,
                   "core_seconds": out["core_seconds"], "orchestration_share": part["share"],
                   "orchestration_share_strict": part["strict_share"],
                   "orchestration_share_empty_fit_estimate": estimate / wall}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
