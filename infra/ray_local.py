"""Ray Train fits, made cheaper to start on the local Ray we start: the controller in the driver, workers with
no runtime environment, no autoscaling coordinator.

- **The controller in the driver.** Ray Train V2 runs every fit's `TrainController` as an actor: a Python process
  that starts and imports Ray Train before it can start a single worker (~1.6 s of every fit's start-up on 2
  cores, with one core idle). On the local Ray the driver is on the one node anyway, has Ray Train imported, and
  waits in `fit()` for the whole fit, so `run_in_driver` runs the same controller there, in an event loop of
  its own. The workers get no handle to it (the driver is no actor); the one call that needs it,
  `ray.train.get_all_reported_checkpoints`, says so. `GPTFLOW_TRAIN_CONTROLLER=actor` keeps Ray's actor.
- **Workers with no runtime environment.** Ray Train gives every worker the Ray Train variables set in the
  driver (the poll interval, ...) as a runtime environment, and Ray starts a worker with a runtime environment
  through its runtime-env agent: a new actor took 0.9-1.05 s to answer with one, 0.5 s without (a one-off
  script). The workers of a local Ray that we started inherit those variables already, so they get none.
- **No autoscaling coordinator.** Ray Train's fixed scaling policy registers each fit's resources with an
  `AutoscalingCoordinator`, a detached actor that tells a cluster's autoscaler (and Ray Data) what the run
  needs: the first fit on a Ray starts it (one more process), and each fit asks it for resources and cancels
  them. A local Ray has no autoscaler to tell, so a fit there gets `LocalScalingPolicy` instead.

`infra.ray_cluster.torch_trainer` applies these on a local Ray (`python -m bench.orchestration` measures them); on
a cluster (`RAY_ADDRESS`) the controller and the policy stay Ray's.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import threading
from typing import Any

import ray
from ray.train.v2._internal.constants import get_env_vars_to_propagate
from ray.train.v2._internal.execution.controller.controller import TrainController
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
from ray.train.v2._internal.execution.worker_group.worker import RayTrainWorker
from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

from infra.ray_cluster import STRUCTURED_LOGGING_ENV, local_env

CONTROLLER_ENV = "GPTFLOW_TRAIN_CONTROLLER"  # "driver" (the default on a local Ray) or "actor" (Ray's)


class LocalScalingPolicy(FixedScalingPolicy):
    """The same decisions (the configured worker count, always), with no resource requests to send."""

    def _maybe_send_resource_request(self) -> None:
        pass

    def _send_resource_request(self) -> None:
        pass

    def _cancel_resource_request(self) -> None:
        pass


def controller_in_driver() -> bool:
    """Whether a local fit runs its controller in the driver: asked for, and this Ray's worker group and
    workers have the methods and argument replaced below (another Ray version keeps the actor)."""
    if os.environ.get(CONTROLLER_ENV, "driver") != "driver":
        return False
    init = inspect.signature(RayTrainWorker.init_train_context).parameters
    return "controller_actor" in init and all(
        hasattr(WorkerGroup, name) for name in ("_init_train_context_on_workers", "_decorate_worker_log_file_paths",
                                            "_get_worker_runtime_env"))


class NoController:
    """What a worker holds in place of the controller's actor handle when the controller runs in the driver."""

    class _Call:
        def remote(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"this fit's Ray Train controller runs in the driver, which workers cannot call; "
                               f"set {CONTROLLER_ENV}=actor to run it as Ray's actor")

    get_all_reported_checkpoints = _Call()


class DriverWorkerGroup(WorkerGroup):
    def _init_train_context_on_workers(self, workers: list, sync_actor: Any, train_context_args: dict) -> None:
        """As Ray's, less `ray.get_runtime_context().current_actor`, which a driver does not have."""
        ray.get([
            worker.actor.init_train_context.remote(
                train_run_context=self._train_run_context,
                distributed_context=worker.distributed_context,
                synchronization_actor=sync_actor,
                storage_context=self._storage_context,
                worker_callbacks=self._worker_callbacks_to_propagate,
                controller_actor=NoController(),
                **{arg: values[i] for arg, values in train_context_args.items()},
            )
            for i, worker in enumerate(workers)
        ])
        self._decorate_worker_log_file_paths(workers)

    @staticmethod
    def _get_worker_runtime_env(custom_runtime_env: dict) -> dict:
        """As Ray's, less the Ray Train variables that the workers have already: those of a local Ray that we
        started inherit the environment it started with, and a worker with no runtime environment of its own
        starts without a round trip through Ray's runtime-env agent. A variable changed since is still sent."""
        inherited = local_env()
        env_vars = {k: v for k, v in get_env_vars_to_propagate().items()
                    if inherited is None or inherited.get(k) != v}
        env_vars.update(custom_runtime_env.get("env_vars", {}))
        runtime_env = {k: v for k, v in dict(custom_runtime_env).items() if k != "env_vars"}
        return runtime_env | ({"env_vars": env_vars} if env_vars else {})


class DriverController(TrainController):
    worker_group_cls = DriverWorkerGroup


def run_in_driver(**controller_kwargs: Any) -> Any:
    """Run one fit's controller here, to its end, and return its `Result`. An interrupt or error on the way
    stops the fit's workers before it is raised."""
    os.environ.setdefault(STRUCTURED_LOGGING_ENV, "0")  # `ray_init` sets it before Ray starts; this, on any other
    controller = DriverController(**controller_kwargs)
    try:
        _run_coroutine(controller.run())
    except BaseException:
        group = controller.get_worker_group()
        if group is not None and group.has_started():
            group.abort()
        raise
    return controller.get_result()


def _run_coroutine(coro: Any) -> None:
    """`asyncio.run`, from a thread of its own when this one already runs an event loop. In the main thread,
    Ctrl-C raises `KeyboardInterrupt` for the length of the run: a fit on Ray's actor leaves its own SIGINT
    handler behind, which asks that finished fit's controller to abort."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        main = threading.current_thread() is threading.main_thread()
        before = signal.signal(signal.SIGINT, signal.default_int_handler) if main else None
        try:
            asyncio.run(coro)
        finally:
            if main and before is not None:
                signal.signal(signal.SIGINT, before)
        return
    failed: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:  # handed to the caller
            failed.append(exc)

    thread = threading.Thread(target=run, name="ray-train-controller")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
