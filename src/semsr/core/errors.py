"""User-facing errors.

Anything raised as :class:`SemsrError` is reported by the CLI as a single line
(``semsr: error: <path>: <message>``) with a non-zero exit code and no traceback
(unless ``--debug`` is given). Library code raises it for bad input, missing
files and unavailable models; programming errors stay ordinary exceptions.
"""

from __future__ import annotations

from pathlib import Path


class SemsrError(Exception):
    """A problem the user can fix (bad input, missing weights, wrong option).

    Args:
        message: one-line description of the problem.
        path: the file or folder the problem is about, if any; it is put in
            front of the message so the user sees which input failed.
    """

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InputError(SemsrError):
    """An input image or file cannot be read or is not acceptable."""


class UnavailableError(SemsrError):
    """A model, weight file or optional dependency is not available here."""

    exit_code = 3


class Terminated(KeyboardInterrupt):
    """The process received a termination signal (SIGTERM); handled like Ctrl-C.

    Raised by the CLI's signal handler so that ``finally`` blocks run: the
    current output is finished or dropped (never left partial), the ``--json``
    report and the summary are written, and the exit code is ``128 + signum``.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def unsafe_pickle_message(err: BaseException) -> str | None:
    """A one-line reason for a pickle that ``torch.load(weights_only=True)`` refused, else ``None``.

    PyTorch's own message advises retrying with ``weights_only=False``, which
    would run code from the file; semsr never does that, so the advice is replaced.
    """
    text = str(err)
    if "Weights only load failed" in text or "weights_only" in text or "Unsupported global" in text:
        return (
            "the file holds pickled Python objects besides tensors; semsr loads pickles only with "
            "weights_only=True and will not unpickle them (they could run code); convert it to .safetensors"
        )
    return None
