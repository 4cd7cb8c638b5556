"""Workers kept for the next fit (`infra.ray_local.warm_workers`, which the pipeline holds around its Ray Train
stages): real fits on the session's Ray. Inside the block a fit that ended well leaves its worker processes and
its synchronization actor to the next fit of the same shape, whose process group and barriers work on them; a
fit of another shape, a failed fit, a kept worker that died and the block's end each stop them; outside the
block, or with `GPTFLOW_KEEP_WORKERS=0`, nothing is kept. That a training fit on kept workers follows the same loss curve as on new ones is checked in
test_pretrain.

Run: `.venv/bin/python -m pytest tests/unit/test_warm_workers.py -q`
"""

from __future__ import annotations

import os
import signal
import sys

import pytest
from killing import alive, eventually, gone
from ray import cloudpickle
from ray.train import RunConfig, ScalingConfig

from infra.ray_cluster import torch_trainer
from infra.ray_local import KEEP_ENV, kept_worker_pids, warm_workers

pytestmark = pytest.mark.ray


def _pids_and_sum(config: dict) -> None:
    """Each rank writes its pid, the sum of rank + 1 over the process group, what rank 0 broadcast through Ray
    Train's synchronization actor, and that actor's id."""
    import os

    import ray.train
    import ray.train.collective
    import torch
    from ray.train.v2._internal.execution.context import get_train_context

    ctx = ray.train.get_context()
    t = torch.tensor([ctx.get_world_rank() + 1.0])
    if ctx.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    said = ray.train.collective.broadcast_from_rank_zero(f"hello-{ctx.get_world_rank()}")
    sync = get_train_context().get_synchronization_actor()._actor_id.hex()
    with open(f"{config['out']}.{ctx.get_world_rank()}", "w") as fh:
        fh.write(f"{os.getpid()} {t.item()} {said} {sync}")
    if config.get("fail"):
        raise RuntimeError("this loop fails")


def _fit(tmp_path, name: str, workers: int = 2, fail: bool = False) -> list[int]:
    """A fit of `_pids_and_sum` on `workers` workers; the pid of each rank, after checking the sum and the
    broadcast."""
    out = tmp_path / name
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        torch_trainer(_pids_and_sum, train_loop_config={"out": str(out), "fail": fail},
                      scaling_config=ScalingConfig(num_workers=workers),
                      run_config=RunConfig(name=name, storage_path=str(tmp_path))).fit()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    seen = [(tmp_path / f"{name}.{rank}").read_text().split() for rank in range(workers)]
    assert [float(s) for _, s, _, _ in seen] == [workers * (workers + 1) / 2] * workers
    assert [said for _, _, said, _ in seen] == ["hello-0"] * workers
    return [int(pid) for pid, _, _, _ in seen]


def _sync_actor(tmp_path, name: str) -> str:
    """The id of the synchronization actor that fit `name` used."""
    return (tmp_path / f"{name}.0").read_text().split()[3]


def _cpus_free() -> bool:
    import ray

    return eventually(lambda: ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU"))


def test_inside_the_block_a_fit_of_the_same_shape_takes_over_the_workers_and_the_block_stops_them(ray_once, tmp_path):
    with warm_workers():
        first = _fit(tmp_path, "first")
        assert kept_worker_pids() == first
        second = _fit(tmp_path, "second")
        assert second == first  # the same processes, and their new process group sums over both ranks
        assert _sync_actor(tmp_path, "second") == _sync_actor(tmp_path, "first")  # its barriers work again
        assert all(map(alive, first))
        alone = _fit(tmp_path, "alone", workers=1)  # another shape: the kept two stop, one new worker
        assert alone[0] not in first and gone(first)
        assert _fit(tmp_path, "alone-again", workers=1) == alone  # a 1-worker process group made again
    assert gone(alone), "the block's end left the kept worker running"
    assert _cpus_free(), "the block's end left the kept workers' placement group holding CPUs"


def test_outside_the_block_or_switched_off_a_fit_keeps_nothing(ray_once, tmp_path, monkeypatch):
    outside = _fit(tmp_path, "outside")
    assert kept_worker_pids() == [] and gone(outside) and _cpus_free()
    monkeypatch.setenv(KEEP_ENV, "0")
    with warm_workers():
        off = _fit(tmp_path, "off")
        assert kept_worker_pids() == [] and gone(off) and _cpus_free()


def test_a_failed_fit_leaves_no_workers_and_the_next_starts_new_ones(ray_once, tmp_path):
    with warm_workers():
        with pytest.raises(Exception, match="this loop fails"):
            _fit(tmp_path, "failed", fail=True)
        failed = [int((tmp_path / f"failed.{rank}").read_text().split()[0]) for rank in range(2)]
        assert gone(failed)
        after = _fit(tmp_path, "after")
        assert not set(failed) & set(after) and _sync_actor(tmp_path, "after") != _sync_actor(tmp_path, "failed")
    assert gone(after)


def test_a_kept_worker_that_died_is_replaced_and_the_fit_runs(ray_once, tmp_path):
    with warm_workers():
        first = _fit(tmp_path, "first")
        os.kill(first[1], signal.SIGKILL)
        assert gone(first[1:])
        second = _fit(tmp_path, "second")
        assert not set(first) & set(second) and gone(first)
    assert gone(second) and _cpus_free()
