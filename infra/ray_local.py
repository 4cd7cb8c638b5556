"""Ray Train fits, made cheaper to start on the local Ray we start: the controller in the driver, workers with
no runtime environment, workers kept for the next fit, no autoscaling coordinator.

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
- **Workers kept for the next fit**, inside `warm_workers()`, which the pipeline holds around its Ray Train
  stages (`GPTFLOW_KEEP_WORKERS=0` turns it off). Each fit used to start its worker processes afresh, and each
  imported Ray Train and torch before its first step (~2.5-3 CPU-s a worker), beside a synchronization actor
  (~1.9 CPU-s). Inside the block, a fit that ends well leaves its workers, their placement group and its
  synchronization actor (its barriers all released) to the next fit of the same shape (workers, resources,
  collective timeouts, no runtime environment of its own), which sets them up as Ray Train sets up new ones: a
  new train context, a new process group, the loop's own seeds and threads. A fit that fails, one of another shape, or the block's end
  stops them. Only inside the block: kept workers hold their CPUs, which other Ray work would wait for.
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
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray.train.v2._internal.constants import get_env_vars_to_propagate
from ray.train.v2._internal.execution.controller.controller import TrainController
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
from ray.train.v2._internal.execution.worker_group import worker_group as ray_worker_group
from ray.train.v2._internal.execution.worker_group.worker import RayTrainWorker
from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

from infra.ray_cluster import STRUCTURED_LOGGING_ENV, local_env

log = logging.getLogger(__name__)

CONTROLLER_ENV = "GPTFLOW_TRAIN_CONTROLLER"  # "driver" (the default on a local Ray) or "actor" (Ray's)
KEEP_ENV = "GPTFLOW_KEEP_WORKERS"  # "0": every fit starts its own workers, even inside warm_workers()
KEEP_CHECK_S = 10  # how long kept workers may take to answer before a fit starts new ones


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
                                            "_get_worker_runtime_env", "_create_placement_group", "_create_workers",
                                            "get_latest_poll_status"))


class NoController:
    """What a worker holds in place of the controller's actor handle when the controller runs in the driver."""

    class _Call:
        def remote(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"this fit's Ray Train controller runs in the driver, which workers cannot call; "
                               f"set {CONTROLLER_ENV}=actor to run it as Ray's actor")

    get_all_reported_checkpoints = _Call()


class _Kept:
    """The workers, placement group and synchronization actor that the last fit left for the next, inside
    `warm_workers()`."""

    on = False  # inside warm_workers()
    key: tuple | None = None
    state: Any = None  # Ray Train's WorkerGroupState

    @classmethod
    def take(cls, key: tuple | None) -> Any:
        """The kept state when `key` matches it, its workers answer and its synchronization actor holds no barrier;
        else None, with the kept ones stopped."""
        if cls.state is not None and key is not None and key == cls.key:
            state, cls.key, cls.state = cls.state, None, None
            try:
                *_, waiting = ray.get([*(w.actor.get_metadata.remote() for w in state.workers),
                                       state.sync_actor.get_counter.remote()], timeout=KEEP_CHECK_S)
                if waiting == 0:
                    return state
                log.warning("the synchronization actor kept from the last fit holds a barrier; starting anew")
            except (ray.exceptions.RayError, TimeoutError) as exc:
                log.warning("the workers kept from the last fit did not answer (%s); starting new ones", exc)
            state.shutdown()
            return None
        release_warm_workers()
        return None


class _SyncActors:
    """Stands in for Ray Train's `SynchronizationActor` class in its worker-group module, where a group's start
    makes one per fit: a fit that takes over kept workers gets the kept one (`pending`, for this thread's next
    start), any other a new one from Ray's class."""

    pending = threading.local()

    def __init__(self, real: Any) -> None:
        self.real = real

    def options(self, **kwargs: Any) -> Any:
        kept, self.pending.actor = getattr(self.pending, "actor", None), None
        return self.real.options(**kwargs) if kept is None else _Made(kept)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class _Made:
    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.actor


def release_warm_workers() -> None:
    """Stop the workers kept from the last fit and free their placement group."""
    state, _Kept.key, _Kept.state = _Kept.state, None, None
    if state is not None and ray.is_initialized():
        state.shutdown()


def kept_worker_pids() -> list[int]:
    """The process ids of the workers kept from the last fit, by rank; empty when none are kept."""
    return [w.metadata.pid for w in _Kept.state.workers] if _Kept.state is not None else []


@contextmanager
def warm_workers() -> Iterator[None]:
    """Inside this block, the fits of a local Ray with their controller in the driver keep their workers for the
    next fit of the same shape; at its end the kept ones stop. `GPTFLOW_KEEP_WORKERS=0` turns it off."""
    before = _Kept.on
    _Kept.on = before or os.environ.get(KEEP_ENV, "1") != "0"
    try:
        yield
    finally:
        _Kept.on = before
        if not before:
            release_warm_workers()


class _KeepOnShutdown:
    """A finished fit's worker-group state whose `shutdown` runs the workers' shutdown hooks and keeps the workers,
    their placement group and the synchronization actor for the next fit."""

    def __init__(self, state: Any, key: tuple) -> None:
        self._state, self._key = state, key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)

    def shutdown(self) -> None:
        workers = self._state.workers
        ray.wait([w.actor.shutdown.remote() for w in workers], num_returns=len(workers), timeout=5)
        release_warm_workers()
        _Kept.key, _Kept.state = self._key, self._state


class DriverWorkerGroup(WorkerGroup):
    _reusing: Any = None  # the kept state this group's start takes over, between its two calls below

    def _keep_key(self) -> tuple | None:
        """What a fit's workers must share with the kept ones to take them over: this Ray, their count, each one's
        resources and placement, their class, the collective timeouts (the synchronization actor's); None when
        they get a runtime environment of their own (kept workers started without one)."""
        run_config = self._train_run_context.run_config
        if not _Kept.on or self._get_worker_runtime_env(custom_runtime_env=run_config.worker_runtime_env):
            return None
        ctx = self._worker_group_context
        return (ray.get_runtime_context().get_node_id(), ctx.num_workers,
                tuple(sorted(ctx.resources_per_worker.items())), ctx.placement_strategy, repr(ctx.label_selector),
                self._worker_cls, self._collective_timeout_s, self._collective_warn_interval_s)

    def _start(self) -> None:
        try:
            super()._start()
        finally:
            _SyncActors.pending.actor = None  # a start that failed before making its synchronization actor

    def _create_placement_group(self, scaling_config: Any, worker_group_context: Any) -> Any:
        """The kept workers' placement group when this fit can take them over; else a new one (the kept workers
        are stopped first: their placement group holds resources this one may need)."""
        self._reusing = _Kept.take(self._keep_key())
        if self._reusing is not None:
            if isinstance(ray_worker_group.SynchronizationActor, _SyncActors):
                _SyncActors.pending.actor = self._reusing.sync_actor  # made next, by the start that called this
            else:  # another Ray version, where the start makes a new one whatever we do
                ray.kill(self._reusing.sync_actor)
            return self._reusing.placement_group_handle
        return super()._create_placement_group(scaling_config, worker_group_context)

    def _create_workers(self, num_workers: int, placement_group: Any, resources_per_worker: dict,
                        placement_group_bundle_indices: list[int] | None = None, **kwargs: Any) -> list:
        """The kept workers, with the ranks they had, when `_create_placement_group` took them over."""
        reusing, self._reusing = self._reusing, None
        if reusing is not None and placement_group_bundle_indices is None and not any(kwargs.values()):
            return list(reusing.workers)
        return super()._create_workers(num_workers, placement_group, resources_per_worker,
                                       placement_group_bundle_indices, **kwargs)

    def shutdown(self) -> None:
        """As Ray's (the callbacks, the process group's teardown), but the workers of a fit that ended well are
        kept for the next, inside `warm_workers()`."""
        status, key = self.get_latest_poll_status(), self._keep_key()
        if key is not None and self.has_started() and status is not None and status.finished and not status.errors:
            self._worker_group_state = _KeepOnShutdown(self._worker_group_state, key)
        super().shutdown()

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


if isinstance(getattr(ray_worker_group, "SynchronizationActor", None), ray.actor.ActorClass):  # once; as Ray names it
    ray_worker_group.SynchronizationActor = _SyncActors(ray_worker_group.SynchronizationActor)


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
