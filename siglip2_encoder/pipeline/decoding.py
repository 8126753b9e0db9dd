"""A decoding pool that survives its workers: ``fn`` runs on each task in worker processes, a bounded number ahead,
and the results come back in task order. It knows nothing of images or models: ``fn`` turns a task into a result or
into its failure reason (a string), and a task that kills its worker becomes :data:`WORKER_DIED`.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from .store import close_inherited_locks

__all__ = ["DecodingPool", "WORKER_DIED"]

WORKER_DIED = (
    "the process decoding this file died (killed by the system, e.g. out of memory, or a crash in an image "
    "decoder); the file was tried alone and killed its process again"
)

# The worker's function, installed once per worker process (not sent with every task).
_worker_fn: Callable[[Any], Any] | None = None


def _start_worker(fn: Callable[[Any], Any]) -> None:
    global _worker_fn
    close_inherited_locks()  # a killed run's workers must not keep its output folder locked
    _worker_fn = fn
    torch.set_num_threads(1)  # the workers share the CPU with the model
    parent = os.getppid()

    def exit_with_parent() -> None:  # a killed run's workers would otherwise wait for tasks forever
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _run_in_worker(task: Any) -> Any:
    return _worker_fn(task)


_END = object()  # the end of a task stream


class DecodingPool:
    """Runs ``fn`` on tasks in ``num_workers`` forked processes (0: in this process, where a task that crashes its
    decoder ends the run), at most ``ahead`` tasks ahead of the consumer, yielding results in task order.

    When a worker dies, every task not yet finished is tried again alone in a fresh process: a task that kills that
    one too becomes ``"<task>: WORKER_DIED"``, the others their normal results. ProcessPoolExecutor (rather than a
    DataLoader, whose worker deaths surface as exceptions raised from a signal handler anywhere in the main process)
    reports a death on the futures of the tasks it hit.
    """

    def __init__(self, fn: Callable[[Any], Any], num_workers: int, ahead: int) -> None:
        self.fn, self.num_workers, self.ahead = fn, num_workers, max(ahead, num_workers)

    def _pool(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker, initargs=(self.fn,)
        )

    def _alone(self, task: Any) -> Any:
        with self._pool(1) as pool:
            try:
                return pool.submit(_run_in_worker, task).result()
            except BrokenProcessPool:
                return f"{task}: {WORKER_DIED}"

    def __call__(self, tasks: Iterable[Any]) -> Iterator[Any]:
        """The results for ``tasks`` (read lazily: a tar stream is never held whole), in their order."""
        if self.num_workers == 0:
            yield from map(self.fn, tasks)
            return
        source = iter(tasks)
        todo: deque = deque()
        pending: deque[tuple[Any, Future]] = deque()
        pool = self._pool(self.num_workers)
        try:
            while True:
                while len(todo) + len(pending) < self.ahead and (task := next(source, _END)) is not _END:
                    todo.append(task)
                if not (todo or pending):
                    return
                try:
                    while todo:
                        pending.append((todo[0], pool.submit(_run_in_worker, todo[0])))
                        todo.popleft()
                    result = pending[0][1].result()
                except BrokenProcessPool:  # from result(), or from submit() once the pool noticed a death
                    pool.shutdown(cancel_futures=True)
                    for task, future in pending:
                        finished = future.done() and not future.cancelled() and future.exception() is None
                        yield future.result() if finished else self._alone(task)
                    pending.clear()
                    pool = self._pool(self.num_workers)
                    continue
                pending.popleft()
                yield result
        finally:
            pool.shutdown(cancel_futures=True)
