"""One-at-a-time job queue for the web demo.

Upscaling can take most of a machine's memory, so the demo runs one job at a
time: :class:`JobQueue` has a single worker thread; other jobs wait in FIFO
order and report their position (``0`` = running, ``n`` = ``n`` jobs ahead).
At most ``max_jobs`` jobs may be waiting or running; more are refused
(:class:`QueueFull`), so nobody can pile up work without bound.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from semsr.core.errors import SemsrError

log = logging.getLogger("semsr.ui")

STATES = ("queued", "running", "done", "error", "cancelled")


class QueueFull(SemsrError):
    """The queue already holds ``max_jobs`` waiting or running jobs."""


@dataclass
class Job:
    """A unit of work and its progress (read by the status endpoint).

    Attributes:
        id: short unique id.
        kind: ``"upscale"`` or ``"priors"``.
        params: the request (method, options...).
        state: one of :data:`STATES`.
        stage, done, total: progress of the current stage (``"load"``,
            ``"tiles"``, ``"denoise"``...; ``total`` 0 = unknown).
        message: error message (``state == "error"``).
        output: what the runner returned (JSON-ready dict).
    """

    id: str
    kind: str
    params: dict[str, Any]
    state: str = "queued"
    stage: str = ""
    done: int = 0
    total: int = 0
    message: str = ""
    output: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    def progress(self, stage: str, done: int, total: int) -> None:
        """Progress callback for the runner: ``stage``, ``done`` of ``total`` units."""
        self.stage, self.done, self.total = stage, int(done), int(total)


Runner = Callable[[Job], dict[str, Any]]


class JobQueue:
    """FIFO queue with a single worker thread running ``runner(job)``.

    Args:
        runner: does the work; returns the job's JSON-ready output; raises
            :class:`~semsr.core.errors.SemsrError` for user errors (message shown
            as is) or anything else (reported as an internal error).
        max_jobs: most jobs waiting or running at once.
        keep: finished jobs remembered for status requests (oldest dropped).
        on_forget: called with each job dropped from memory (to delete its files).
    """

    def __init__(
        self, runner: Runner, max_jobs: int = 8, keep: int = 64, on_forget: Callable[[Job], None] | None = None
    ) -> None:
        self.runner = runner
        self.max_jobs = max_jobs
        self.keep = keep
        self.on_forget = on_forget
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._pending: list[str] = []
        self._running: str | None = None
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="semsr-ui-worker", daemon=True)
        self._thread.start()

    def submit(self, kind: str, params: dict[str, Any]) -> Job:
        """Queue a job; raise :class:`QueueFull` when ``max_jobs`` are waiting or running."""
        with self._cond:
            busy = len(self._pending) + (self._running is not None)
            if busy >= self.max_jobs:
                raise QueueFull(f"the queue is full ({busy} jobs waiting or running); try again in a minute")
            job = Job(id=f"j{next(self._ids)}-{int(time.time() * 1000) % 100000:05d}", kind=kind, params=params)
            self._jobs[job.id] = job
            self._pending.append(job.id)
            self._forget_old()
            self._cond.notify_all()
            return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """0 when running or finished, else the number of jobs ahead of it (running one included)."""
        with self._cond:
            if job.id not in self._pending:
                return 0
            return self._pending.index(job.id) + (self._running is not None)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued (not yet running) job; True when it was cancelled."""
        with self._cond:
            if job_id in self._pending:
                self._pending.remove(job_id)
                self._jobs[job_id].state = "cancelled"
                self._cond.notify_all()
                return True
            return False

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after the running job (queued jobs are dropped)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in ("done", "error", "cancelled")]
        for job in finished[: max(0, len(self._jobs) - self.keep)]:
            del self._jobs[job.id]
            if self.on_forget is not None:
                try:
                    self.on_forget(job)
                except OSError:
                    pass

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._jobs[self._pending.pop(0)]
                self._running = job.id
                job.state, job.started = "running", time.time()
            try:
                job.output = self.runner(job)
                job.state = "done"
            except SemsrError as err:
                job.message, job.state = err.message, "error"
            except MemoryError:
                job.message, job.state = "out of memory: try a smaller image or a smaller tile", "error"
            except Exception as err:
                log.error("job %s failed:\n%s", job.id, traceback.format_exc())
                job.message, job.state = f"internal error: {type(err).__name__}: {err}", "error"
            finally:
                job.finished = time.time()
                with self._cond:
                    self._running = None
                    self._cond.notify_all()
