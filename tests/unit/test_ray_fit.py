"""How `infra.ray_cluster.torch_trainer` starts a Ray Train fit: on our torch backend (`infra.ray_torch`), whose
controller unpickles what the trainer sends it without importing torch, which Ray's own `TorchConfig` cannot; and
on a local Ray with its controller in the driver and without the autoscaling coordinator (`infra.ray_local`). Real
2-worker fits on the session's Ray check the process group, the coordinator, where the controller runs (also from
inside a running event loop), that an interrupt stops the workers and that the workers get no runtime environment;
the training fits (DDP and FSDP over gloo, kill and resume) are those of test_pretrain and test_sft_train, which go
through `torch_trainer` too.

Run: `.venv/bin/python -m pytest tests/unit/test_ray_fit.py -q`
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from killing import gone
from ray import cloudpickle
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig

from infra.env import REPO_ROOT
from infra.ray_cluster import torch_trainer
from infra.ray_local import CONTROLLER_ENV
from infra.ray_torch import LazyTorchBackend, LazyTorchConfig, supported

WARN_ENV = "RAY_TRAIN_COLLECTIVE_WARN_INTERVAL_S"  # a Ray Train variable that Ray Train sends to its workers
# A fresh interpreter, as the controller's process is: unpickle stdin, say whether torch got imported.
UNPICKLE = "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); print('torch' in sys.modules)"


def _loop(config: dict) -> None:
    pass


def _all_reduce_ranks(config: dict) -> None:
    """Each rank adds its rank + 1 over the process group; rank 0 writes the sum and the group's backend."""
    import json

    import ray.train
    import torch

    rank = ray.train.get_context().get_world_rank()
    t = torch.tensor([rank + 1.0])
    torch.distributed.all_reduce(t)
    if rank == 0:
        with open(config["out"], "w") as fh:
            json.dump({"sum": t.item(), "backend": torch.distributed.get_backend()}, fh)


def _ask_the_controller(config: dict) -> None:
    """Rank 0 writes what `ray.train.get_all_reported_checkpoints` (the one call to the controller) gives."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        try:
            answer = f"checkpoints: {ray.train.get_all_reported_checkpoints()}"
        except RuntimeError as exc:
            answer = str(exc)
        with open(config["out"], "w") as fh:
            fh.write(answer)


def _runtime_env(config: dict) -> None:
    """Rank 0 writes its runtime environment and the variable the test may have changed."""
    import json
    import os

    import ray
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        with open(config["out"], "w") as fh:
            json.dump({"runtime_env": json.loads(ray.get_runtime_context().get_runtime_env_string()),
                       "warn": os.environ.get(WARN_ENV)}, fh)


def _wait_forever(config: dict) -> None:
    """Each rank writes its pid, then sleeps past any test's patience."""
    import os
    import time

    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with open(f"{config['out']}.{rank}", "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(600)


def _fit(loop, tmp_path, name: str) -> None:
    """A 2-worker fit of `loop` (defined in this module, which the workers cannot import: sent by value)."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        torch_trainer(loop, train_loop_config={"out": str(tmp_path / "out")},
                      scaling_config=ScalingConfig(num_workers=2),
                      run_config=RunConfig(name=name, storage_path=str(tmp_path))).fit()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def controller_imports_torch(tmp_path, **kwargs) -> bool:
    """What `DataParallelTrainer.fit` hands its controller actor (the callbacks, which hold the backend config,
    and the run context), unpickled in a new process."""
    trainer = torch_trainer(_loop, scaling_config=ScalingConfig(num_workers=2),
                            run_config=RunConfig(name="t", storage_path=str(tmp_path)), **kwargs)
    blob = cloudpickle.dumps((trainer._create_default_callbacks(), trainer.train_run_context))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", UNPICKLE], input=blob, capture_output=True, env=env, check=True)
    return out.stdout.decode().strip() == "True"


def test_this_ray_has_the_worker_steps_our_backend_calls():
    assert supported()


def test_the_controller_of_our_fit_does_not_import_torch_and_of_rays_own_does(tmp_path):
    trainer = torch_trainer(_loop, scaling_config=ScalingConfig(num_workers=2))
    assert isinstance(trainer.backend_config, LazyTorchConfig)
    assert trainer.backend_config.backend == "gloo"  # set by TorchTrainer for CPU workers, as for its own config
    assert trainer.backend_config.backend_cls is LazyTorchBackend
    assert not controller_imports_torch(tmp_path)
    assert controller_imports_torch(tmp_path, torch_config=TorchConfig())  # the cost our backend removes


def test_a_torch_config_passed_by_the_caller_is_kept():
    trainer = torch_trainer(_loop, scaling_config=ScalingConfig(num_workers=1), torch_config=TorchConfig(timeout_s=60))
    assert isinstance(trainer.backend_config, TorchConfig) and trainer.backend_config.timeout_s == 60


@pytest.mark.parametrize("use_gpu, backend", [(False, "gloo"), (True, "nccl")])
def test_the_process_group_backend_follows_the_workers(use_gpu, backend):
    trainer = torch_trainer(_loop, scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu))
    assert trainer.backend_config.backend == backend


@pytest.mark.ray
def test_a_local_fit_runs_a_gloo_group_without_starting_the_autoscaling_coordinator(ray_once, tmp_path):
    import ray

    _fit(_all_reduce_ranks, tmp_path, "allreduce")
    assert json.loads((tmp_path / "out").read_text()) == {"sum": 3.0, "backend": "gloo"}
    coordinators = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == "AutoscalingCoordinator"]
    assert coordinators == []


@pytest.mark.ray
@pytest.mark.parametrize("where", ["driver", "actor"])
def test_a_local_fit_runs_its_controller_in_the_driver_unless_asked_for_rays_actor(where, ray_once, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv(CONTROLLER_ENV, where)
    _fit(_ask_the_controller, tmp_path, where)
    answer = (tmp_path / "out").read_text()
    if where == "driver":  # a worker cannot call a controller that is no actor, and says so
        assert "controller runs in the driver" in answer and f"{CONTROLLER_ENV}=actor" in answer
    else:
        assert answer == "checkpoints: []"


@pytest.mark.ray
def test_a_fit_called_inside_a_running_event_loop_runs(ray_once, tmp_path):
    """As in Jupyter, whose cells run inside an event loop, where `asyncio.run` cannot start the controller's."""
    import asyncio

    async def cell() -> None:
        _fit(_all_reduce_ranks, tmp_path, "in-a-loop")

    asyncio.run(cell())
    assert json.loads((tmp_path / "out").read_text()) == {"sum": 3.0, "backend": "gloo"}


@pytest.mark.ray
def test_the_workers_of_a_local_fit_get_no_runtime_env_but_a_variable_changed_since_ray_started(ray_once, tmp_path,
                                                                                              monkeypatch):
    from infra.ray_cluster import POLL_ENV

    assert os.environ[POLL_ENV] == "0.2"  # set before Ray started, sent by Ray Train to every worker otherwise
    monkeypatch.delenv(WARN_ENV, raising=False)
    _fit(_runtime_env, tmp_path / "same", "same")
    assert json.loads((tmp_path / "same" / "out").read_text()) == {"runtime_env": {}, "warn": None}
    monkeypatch.setenv(WARN_ENV, "123")  # after Ray started: the workers cannot have it but through Ray Train
    _fit(_runtime_env, tmp_path / "changed", "changed")
    seen = json.loads((tmp_path / "changed" / "out").read_text())
    assert seen == {"runtime_env": {"env_vars": {WARN_ENV: "123"}}, "warn": "123"}, seen


@pytest.mark.ray
def test_an_interrupt_during_a_fit_in_the_driver_stops_its_workers(ray_once, tmp_path):
    import _thread
    import threading
    import time

    pids: list[int] = []

    def interrupt_once_both_workers_run() -> None:
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            pids[:] = [int(p.read_text()) for p in tmp_path.glob("out.*") if p.read_text()]
        _thread.interrupt_main()  # as Ctrl-C does

    threading.Thread(target=interrupt_once_both_workers_run, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        _fit(_wait_forever, tmp_path, "interrupted")
    assert len(pids) == 2
    assert gone(pids), "the workers outlived the interrupted fit"


@pytest.mark.ray
def test_one_progress_queue_serves_every_bar_of_a_ray_session_and_a_second_bar_at_once_gets_its_own(ray_once, tmp_path):
    import ray

    from infra.progress import ray_progress, report_clock, report_progress

    marks: dict[str, list[float]] = {}
    with open(tmp_path / "a.txt", "w") as fa, ray_progress(4, "a", fa, marks) as first:
        report_clock(first, "loop_start")
        report_progress(first, 4, loss=1.5)
        with open(tmp_path / "b.txt", "w") as fb, ray_progress(2, "b", fb) as other:
            report_progress(other, 2)
        assert other.actor != first.actor
    with open(os.devnull, "w") as fc, ray_progress(1, "c", fc) as again:
        assert again.actor == first.actor  # the session's queue, started once
    assert list(marks) == ["loop_start"]
    assert "4/4" in (tmp_path / "a.txt").read_text() and "loss=1.5" in (tmp_path / "a.txt").read_text()
    assert "2/2" in (tmp_path / "b.txt").read_text()
    with pytest.raises(ray.exceptions.RayActorError):  # the second bar's own queue is gone with its bar
        ray.get(other.actor.qsize.remote())
    report_clock(other, "loop_end")  # a lost queue costs the mark, not the worker's loop
