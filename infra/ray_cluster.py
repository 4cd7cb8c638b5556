"""Start or join Ray: a local Ray inside the workspace by default, the cluster at `RAY_ADDRESS` when set."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from infra.env import REPO_ROOT, workspace

log = logging.getLogger(__name__)

POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"  # Ray Train's poll of its workers (default 2 s)
# Ray Train configures the `ray.train` logger of its controller's process with `logging.config.dictConfig`,
# which closes every other handler of that process: in the driver (`infra.ray_local`), Prefect's and ours.
STRUCTURED_LOGGING_ENV = "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING"


_local_env: tuple[str, dict[str, str]] | None = None  # (node id, environment) of the local Ray we started


def ray_init(num_cpus: int | None = None) -> None:
    global _local_env
    import ray

    if ray.is_initialized():
        return
    # Ray Train's controller takes in a worker's report (metrics and checkpoint) only when it polls the workers,
    # every 2 s by default, and a worker's next report waits for that poll: a fit whose checkpoints came quicker
    # stalled at each one, and every fit's end waited ~4 s for its last report. Polling every 0.2 s costs a
    # remote call per worker each time, which did not slow a compute-bound loop measurably (`python -m
    # bench.orchestration`: the report stall and the fit's end at 2, 0.5 and 0.2 s, and a loop's compute).
    os.environ.setdefault(POLL_ENV, POLL_S)
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    if os.environ.get("RAY_ADDRESS"):  # a cluster's workers get our variables through the job's runtime env
        passed = ("HF_HOME", "HF_ASSETS_CACHE", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI", "GPTFLOW_HOME",
                  "TOKENIZERS_PARALLELISM", "MLFLOW_DISABLE_TELEMETRY", POLL_ENV)  # datatrove's assets: under HF_*
        env_vars = {k: os.environ[k] for k in passed if k in os.environ} | {"PYTHONPATH": python_path}
        runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": "infra.ray_cluster.quiet_worker_logs"}
        log.info("joining the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=True)
        return
    # One machine has no spot preemption to watch for: no PreemptionWatcher actor (a process per fit).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault(STRUCTURED_LOGGING_ENV, "0")  # see infra.ray_local (the controller runs in the driver)
    # No runtime environment for the job: the local Ray's workers inherit this process's environment, and Ray
    # starts a worker with an empty runtime environment without a round trip through its runtime-env agent
    # (`infra.ray_local`; `python -m bench.orchestration`: the empty fits).
    if str(REPO_ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = python_path
    temp = workspace() / "ray"
    temp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        _temp_dir=str(temp),
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    _local_env = ray.get_runtime_context().get_node_id(), env


def local_env() -> dict[str, str] | None:
    """The environment that the local Ray this process started gave its workers; None for any other Ray."""
    import ray

    if _local_env is None or not ray.is_initialized() or ray.get_runtime_context().get_node_id() != _local_env[0]:
        return None
    return _local_env[1]


def torch_trainer(loop: Any, **kwargs: Any) -> Any:
    """Ray Train's `TorchTrainer(loop, **kwargs)`, made cheaper to start (`python -m bench.orchestration`):
    - less two helper actors that a fit of ours does not use, each a Python process started per fit (an empty
      2-worker fit 17 s -> ~11 s on 2 cores): the DatasetManager, which Ray Train V2 starts even when no Ray
      Dataset is passed, and, on the local Ray we start without a dashboard, the placement-group cleaner, which
      asks the dashboard's state API whether the controller died and so can never act there;
    - on our torch backend (`infra.ray_torch`), whose controller does not import torch, unless `torch_config` is
      passed;
    - on a local Ray, with its controller in the driver and without the autoscaling coordinator
      (`infra.ray_local`).
    On a cluster (`RAY_ADDRESS`) the cleaner, the controller's actor and the coordinator stay. Another Ray
    version: the defaults."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

        from infra import ray_local, ray_torch
    except ImportError:
        return TorchTrainer(loop, **kwargs)
    if ray_torch.supported():
        kwargs.setdefault("torch_config", ray_torch.LazyTorchConfig())
    local = not os.environ.get("RAY_ADDRESS")
    unused = (PlacementGroupCleanerCallback,) if local else ()

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            drop = unused + (() if self.datasets else (DatasetsCallback,))
            return [c for c in super()._create_default_callbacks() if not isinstance(c, drop)]

        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            if not local:
                return super()._initialize_and_run_controller(**kwargs)
            if type(kwargs.get("scaling_policy")) is FixedScalingPolicy:
                kwargs["scaling_policy"] = ray_local.LocalScalingPolicy(self.scaling_config)
            if ray_local.controller_in_driver():
                return ray_local.run_in_driver(**kwargs)
            return super()._initialize_and_run_controller(**kwargs)

    return Trainer(loop, **kwargs)


def quiet_worker_logs() -> None:
    """Run by Ray in every worker process it starts. Ray Train's placement-group cleaner asks the state API,
    which lives in the dashboard, whether the run's controller is alive; without a dashboard (ours is off) it
    warned "State API may be temporarily unavailable" once a second for the whole fit. Its real errors stay."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


@contextmanager
def ray_session(num_cpus: int | None = None, keep_workers: bool = False) -> Iterator[None]:
    """Ray for the length of one job. A local Ray that this call started is shut down afterwards: its gRPC
    threads do not survive a later fork of this process (datatrove, Trafilatura), which hung the next job.
    Inside an outer session (the pipeline holds one from after its forking stages to its end) it joins that Ray
    and leaves it running, so the Ray Train stages share one start-up. With `keep_workers`, a local fit leaves
    its workers to the next fit of the same shape until the session ends (`infra.ray_local.warm_workers`)."""
    import ray

    started = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    ray_init(num_cpus)
    try:
        if keep_workers and not os.environ.get("RAY_ADDRESS"):
            from infra.ray_local import warm_workers

            with warm_workers():
                yield
        else:
            yield
    finally:
        if started:
            ray.shutdown()
