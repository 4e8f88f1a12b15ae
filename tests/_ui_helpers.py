"""Shared helpers of the web-demo tests: free ports and a `semsr serve` subprocess."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> float:
    """Seconds until ``url`` answers 200; raise AssertionError after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else '(see stderr file)'}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer 200 within {timeout} s")


@contextlib.contextmanager
def serve(*extra: str, cwd: Path | None = None, stderr: Path | None = None) -> Iterator[tuple[str, float]]:
    """Run ``semsr serve --port <free> *extra``; yield ``(base_url, seconds_to_first_200)``.

    ``stderr``: a file that receives the server's standard error (read it after the block).
    """
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    err_file = open(stderr, "w") if stderr is not None else None  # closed after the server stops
    proc = subprocess.Popen(
        [sys.executable, "-m", "semsr", "serve", "--port", str(port), *extra],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=err_file if err_file is not None else subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        seconds = wait_http(url, 60, proc)
        yield url, seconds
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if err_file is not None:
            err_file.close()
