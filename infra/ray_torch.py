"""Ray Train's torch backend, with a controller that never imports torch.

`TorchTrainer` pickles its `TorchConfig` into the fit's controller process, and unpickling it imports
`ray.train.torch.config`, which imports torch: ~1.2-2 s of CPU at the start of every fit, before the controller
can start a single worker (`python -m bench.orchestration`: the empty fit with either backend). This module
imports no torch. Its backend runs the same steps as Ray's (the rendezvous address from worker 0, the torch
distributed environment variables, `init_process_group`, and at the end its teardown), and each step calls
Ray's own worker-side function by name, so torch is imported only in the workers, which train with it anyway.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 30
RAY_WORKER_STEPS = ("_set_torch_distributed_env_vars", "_setup_torch_process_group", "_shutdown_torch",
                    "TorchConfigContextManager")


def supported() -> bool:
    """Whether this Ray's torch backend has the worker-side steps by the names used here (checked on the driver,
    which has torch already; another Ray version falls back to `TorchConfig`)."""
    from ray.train.torch import config

    return all(hasattr(config, name) for name in RAY_WORKER_STEPS)


def _ray_step(name: str, **kwargs: Any) -> Any:
    """Run on a worker: Ray's torch-backend step `name`."""
    from ray.train.torch import config

    return getattr(config, name)(**kwargs)


def _set_master(addr: str, port: int) -> None:
    import os

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)


@dataclass
class LazyTorchConfig(BackendConfig):
    """`TorchConfig`'s fields that our fits use: the process-group backend (`TorchTrainer` sets nccl for GPU
    workers and gloo for CPU ones when it is None) and its timeout. Rendezvous is always through the environment
    (`env://`)."""

    backend: str | None = None
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[Backend]:
        return LazyTorchBackend

    @property
    def train_func_context(self) -> Any:  # read on the driver only, when the fit wraps the loop
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class LazyTorchBackend(Backend):
    share_cuda_visible_devices = True

    def on_start(self, worker_group: Any, config: LazyTorchConfig) -> None:
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, addr=addr, port=port)
        worker_group.execute(_ray_step, name="_set_torch_distributed_env_vars")
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(
            rank, _ray_step, name="_setup_torch_process_group", backend=config.backend, world_rank=rank, world_size=n,
            init_method="env://", timeout_s=config.timeout_s) for rank in range(n)])

    def on_shutdown(self, worker_group: Any, config: LazyTorchConfig) -> None:
        # Ray's leaves a 1-worker group's process group to the process's end; ours may start the next fit's
        # (`infra.ray_local.warm_workers`), which could not make a new one then.
        done = worker_group.execute_async(_ray_step, name="_shutdown_torch", destroy_process_group=True)
        try:
            ray.get(done, timeout=SHUTDOWN_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            log.warning("the workers' torch process group did not shut down within %d s", SHUTDOWN_TIMEOUT_S)
