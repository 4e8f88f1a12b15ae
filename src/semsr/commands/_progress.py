"""Stage lines of ``semsr upscale`` on a terminal: what runs now, for how long, and when it should end.

A :class:`StageReporter` draws one live line on a terminal (redrawn in place
every half second while a stage runs, so the elapsed time moves even when the
method reports nothing), e.g.::

    [1/3] photo.jpg  denoise 3/8  elapsed 4.1s  ETA 6.8s

and leaves one permanent line per finished step (``loaded default in 5.2s``,
``[1/3] photo.jpg  priors 0.3s, stage1 1.9s, denoise 12.0s, write 0.1s``).
Only stages the CLI can observe are shown live: ``loading`` (building the
method), the method's own ``progress(done, total)`` (``denoise k/N`` for a
method that tiles itself: its sampler steps; ``tile k/N`` otherwise), and
``write``; the time before a method's first report is ``upscale``, after its
last one ``finishing``. The stages inside a method (``stage1``, ``priors``,
``decode``...) are named after the fact from :attr:`SROutput.timings`.

The reporter is off (prints nothing) when disabled: not a terminal, or
``--no-progress``. :meth:`StageReporter.echo` prints an ordinary line above the
live one.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from typing import TextIO

#: Keys of ``SROutput.timings`` that are counts, not seconds.
_COUNT_KEYS = ("steps",)


def seconds(value: float) -> str:
    """``0.4s``, ``12.3s``, ``2m05s``, ``1h02m``."""
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def stage_summary(timings: Mapping[str, float]) -> str:
    """``priors 0.3s, stage1 1.9s, denoise 12.0s (8 steps)`` from a method's ``timings``."""
    parts = []
    for key, value in timings.items():
        if key in _COUNT_KEYS:
            continue
        part = f"{key} {seconds(float(value))}"
        if key == "denoise" and "steps" in timings:
            part += f" ({int(timings['steps'])} steps)"
        parts.append(part)
    return ", ".join(parts)


class StageReporter:
    """Live stage line on ``stream`` (see the module doc); does nothing when ``enabled`` is false.

    Args:
        stream: where the live line goes (the terminal's stderr).
        enabled: draw at all.
        interval: seconds between redraws while nothing is reported.
    """

    def __init__(self, stream: TextIO, enabled: bool, interval: float = 0.5) -> None:
        self.stream = stream
        self.enabled = enabled
        self.interval = interval
        self._lock = threading.RLock()
        self._prefix = ""
        self._label = ""
        self._started = 0.0  # when the current stage began
        self._counting = ""  # the label of the units being counted, if any
        self._counted = (0, 0, 0.0)  # (units done at the first report, total, time of the first report)
        self._done = 0
        self._last = 0.0  # time of the last report
        self._eta_extra: float | None = None  # seconds still needed after this image (the other images)
        self._expected: float | None = None  # seconds this image should take (from the images before it)
        self._shown = False
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    @classmethod
    def for_terminal(cls, no_progress: bool, stream: TextIO | None = None) -> StageReporter:
        """On when ``stream`` (default: ``sys.stderr``) is a terminal and ``--no-progress`` is not given."""
        stream = sys.stderr if stream is None else stream
        isatty = getattr(stream, "isatty", None)
        return cls(stream, not no_progress and bool(isatty and isatty()))

    # ------------------------------------------------------------------ drawing
    def _line(self) -> str:
        now = time.perf_counter()
        text = f"{self._prefix}{self._label}  elapsed {seconds(now - self._started)}"
        first_done, total, since = self._counted
        done = self._done
        eta = None
        if self._counting and total and first_done < done < total:
            per_unit = (self._last - since) / (done - first_done)
            eta = max(per_unit * (total - done) - (now - self._last), 0.0)
        elif not self._counting and self._expected is not None:
            eta = max(self._expected - (now - self._started), 0.0)
        if self._eta_extra is not None:
            eta = (eta or 0.0) + self._eta_extra
        if eta is not None:
            text += f"  ETA {seconds(eta)}"
        return text

    def _draw(self) -> None:
        if not self.enabled or not self._label:
            return
        self.stream.write("\r\x1b[K" + self._line())
        self.stream.flush()
        self._shown = True

    def _clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                self._draw()

    def start(self) -> None:
        """Start redrawing the live line in the background (no-op when disabled)."""
        if self.enabled and self._ticker is None:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, name="semsr-progress", daemon=True)
            self._ticker.start()

    def close(self) -> None:
        """Stop redrawing and remove the live line (safe to call twice, and on Ctrl-C)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2 * self.interval)
            self._ticker = None
        with self._lock:
            self._label = ""
            if self.enabled:
                self._clear()

    # ------------------------------------------------------------------ stages
    def begin(self, prefix: str, label: str, eta_rest: float | None = None, expected: float | None = None) -> None:
        """A new step begins (loading, or one image): ``prefix`` leads the line, elapsed time starts at 0;
        ``eta_rest``: seconds the steps after this one should take (added to the ETA); ``expected``:
        seconds this step should take (the ETA until the method reports its own progress)."""
        with self._lock:
            self._prefix = prefix
            self._eta_extra = eta_rest
            self._expected = expected
            self._started = time.perf_counter()
            self._set(label)

    def stage(self, label: str) -> None:
        """The current step enters stage ``label`` (elapsed time goes on)."""
        with self._lock:
            self._set(label)

    def _set(self, label: str) -> None:
        self._label = label
        self._counting = ""
        self._counted = (0, 0, time.perf_counter())
        self._draw()

    def counter(self, label: str) -> ProgressCounter:
        """A ``progress(done, total)`` callable that shows ``label done/total`` with an ETA."""
        return ProgressCounter(self, label)

    def count(self, label: str, done: int, total: int) -> None:
        """``done`` of ``total`` units of ``label`` are finished (sampler steps, tiles).

        The ETA is the mean time of the units between the first and the last report, times the
        units left, less the time since the last report.
        """
        with self._lock:
            now = time.perf_counter()
            first_done, _, since = self._counted
            if self._counting != label or done <= first_done:  # a new count (or a second run: alpha plane)
                first_done, since = done, now
            self._counting = label
            self._counted = (first_done, total, since)
            self._done = done
            self._last = now
            self._label = f"{label} {done}/{total}" if done < total else "finishing"
            self._draw()

    def echo(self, text: str, file: TextIO | None = None) -> None:
        """Print ``text`` (a whole line) above the live line, which is then redrawn."""
        file = sys.stdout if file is None else file
        with self._lock:
            if self.enabled:
                self._clear()
            print(text, file=file, flush=True)
            self._draw()

    def idle(self) -> None:
        """Remove the live line until the next stage (after a failed input)."""
        with self._lock:
            self._label = ""
            if self.enabled:
                self._clear()

    def done(self, text: str) -> None:
        """Replace the live line with the permanent line ``text`` (terminal only)."""
        with self._lock:
            self._label = ""
            if self.enabled:
                self._clear()
                print(text, file=self.stream, flush=True)


class ProgressCounter:
    """``progress(done, total)`` of a method, shown as ``label done/total`` by a :class:`StageReporter`."""

    def __init__(self, reporter: StageReporter, label: str) -> None:
        self.reporter = reporter
        self.label = label

    def __call__(self, done: int, total: int) -> None:
        self.reporter.count(self.label, int(done), int(total))
