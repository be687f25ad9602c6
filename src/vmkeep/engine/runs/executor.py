"""How a run's tasks are dispatched: the seam for scale-out. Today tasks run on threads of
the runner's process; a later issue dispatches the same payloads to workers on other hosts,
which is why a payload holds only ids and names (serializable), never live objects."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class VmTaskPayload:
    """One VM's work in a run, as a remote worker would receive it: the worker looks the job
    up by name, the VM by uuid and the remote by name in the shared state, and records its
    results on `task_id` in the ledger."""

    run_id: int
    task_id: int
    job_name: str
    vm_uuid: str
    remote_name: str
    mode: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmTaskPayload:
        return cls(**data)


class Executor(Protocol):
    """Runs task functions somewhere; `shutdown(cancel=True)` drops tasks not yet started."""

    def submit(self, fn: Callable[[], T]) -> Future[T]: ...

    def shutdown(self, cancel: bool) -> None: ...


class InProcessExecutor:
    """The default: a thread pool of `max_workers` (the job's `concurrency.vms`)."""

    def __init__(self, max_workers: int) -> None:
        self._pool = ThreadPoolExecutor(max(1, max_workers), thread_name_prefix="vmkeep-task")

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        return self._pool.submit(fn)

    def shutdown(self, cancel: bool) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)
