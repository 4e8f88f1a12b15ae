"""One-at-a-time job queue for the web demo.

Upscaling can take most of a machine's memory, so the demo runs one job at a
time: :class:`JobQueue` has a single worker thread; other jobs wait in FIFO
order and report their position (``0`` = running, ``n`` = ``n`` jobs ahead).
At most ``max_jobs`` jobs may be waiting or running; more are refused
(:class:`QueueFull`), so nobody can pile up work without bound.

A running job stops at its next progress report (:meth:`Job.progress`, which
the runner passes to the method: it is called after every sampler step or
tile) once it is cancelled (:meth:`JobQueue.cancel`) or has run longer than
the queue's ``time_limit``: the report raises :class:`JobCancelled` or
:class:`JobTimeLimit`, which unwinds the method.
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


class JobCancelled(SemsrError):
    """Raised from a running job's progress report after :meth:`JobQueue.cancel`."""


class JobTimeLimit(SemsrError):
    """Raised from a running job's progress report once it has run past the queue's time limit."""


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
        cancel_requested: set by :meth:`JobQueue.cancel` while the job runs.
        time_limit: seconds the job may run (``None`` = no limit); set when it starts.
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
    cancel_requested: bool = False
    time_limit: float | None = None

    def progress(self, stage: str, done: int, total: int) -> None:
        """Progress callback for the runner: ``stage``, ``done`` of ``total`` units; then :meth:`check`."""
        self.stage, self.done, self.total = stage, int(done), int(total)
        self.check()

    def check(self) -> None:
        """Raise :class:`JobCancelled` or :class:`JobTimeLimit` when the job must stop."""
        if self.cancel_requested:
            raise JobCancelled("cancelled while running")
        if self.time_limit is not None and self.started is not None and time.time() - self.started > self.time_limit:
            raise JobTimeLimit(
                f"stopped after {self.time_limit:g} s, the server's time limit for a job (semsr serve --job-timeout)"
            )


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
        time_limit: seconds a job may run before its next progress report stops it (``None`` = no limit).
    """

    def __init__(
        self,
        runner: Runner,
        max_jobs: int = 8,
        keep: int = 64,
        on_forget: Callable[[Job], None] | None = None,
        time_limit: float | None = None,
    ) -> None:
        self.runner = runner
        self.time_limit = time_limit
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

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job: ``"cancelled"`` (it was queued and is dropped), ``"cancelling"`` (it is
        running and stops at its next progress report), ``None`` (unknown or finished)."""
        with self._cond:
            if job_id in self._pending:
                self._pending.remove(job_id)
                self._jobs[job_id].state = "cancelled"
                self._cond.notify_all()
                return "cancelled"
            if job_id == self._running:
                self._jobs[job_id].cancel_requested = True
                return "cancelling"
            return None

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
                job.state, job.started, job.time_limit = "running", time.time(), self.time_limit
            try:
                output = self.runner(job)
                if job.cancel_requested:  # a method that never reported progress: drop its result
                    raise JobCancelled("cancelled while running")
                job.output, job.state = output, "done"
            except JobCancelled as err:
                job.message, job.state = err.message, "cancelled"
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
