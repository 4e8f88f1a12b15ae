"""The web demo's HTTP server: standard-library ``http.server``, no CDN, no analytics.

The page (``static/index.html``, ``app.js``, ``app.css``) talks to a small JSON API:

==========================  ===================================================
``GET  /``                  the page
``GET  /api/config``        limits (upload bytes, pixels, queue, steps, job time), defaults, example images
``GET  /api/methods``       the method picker (:func:`semsr.ui.catalog.catalogue`)
``POST /api/images``        upload one image (raw request body) -> ``{id, width, height}``
``GET  /api/images/<id>``   the uploaded image as PNG
``GET  /api/examples/<name>``  an example image (the bundled sample) as PNG
``POST /api/examples/<name>``  JSON ``{}``: use the example as an upload -> ``{id, width, height}``
``POST /api/jobs``          JSON ``{kind: "upscale"|"priors", image, method, outscale, ...}`` -> ``{id, position}``
``GET  /api/jobs/<id>``     state, queue position, progress, output
``DELETE /api/jobs/<id>``   cancel a job (queued: dropped; running: stopped at its next step)
``GET  /api/jobs/<id>/result[?download=1]``  full-resolution PNG
``GET  /api/jobs/<id>/prior/<name>``         an image prior the method used
==========================  ===================================================

A job's options are validated by the method's options class
(:meth:`semsr.core.method.MethodSpec.parse`) when it is submitted: every
request field other than ``kind``, ``image``, ``method``, ``outscale`` and ``options`` is a
run option of the method (the page sends ``prompt``, ``negative_prompt``,
``steps``, ``guidance_scale``, ``seed``, ``colour_fix``, ``tile``,
``priors_in_prompt``), and ``options`` (a JSON object ``{name: value}``) holds
the method's own; numbers, text and booleans are read as the parser reads
them (``"3"`` and ``3`` alike, ``1.5`` is no integer), ``null`` and ``""``
mean "the default", an image option holds an upload id. An unknown option
(named with the closest valid one), a build option (those come from the
``semsr serve`` command line), a bad value or more sampling steps than
``max_steps`` is a 400 answer with the one-line reason. ``outscale`` (``null``
or ``""`` = the method's own factor) is the result's final factor, as
``semsr upscale --outscale``: a number above 0 and at most the method's scale
(the native result is resized to ``round(outscale * size)``); anything else is
refused with a 400.

What the server refuses before any work (``docs/security.md``): a ``Host``
header that is not an allowed host name (localhost by default: DNS
rebinding), an ``Origin`` that is not the page's own or an allowed one (403);
a job request that is not ``Content-Type: application/json``, an upload sent
as a form type a cross-site page could send without asking (415); a body that
is not UTF-8 JSON, nests deeper than :data:`MAX_JSON_DEPTH` or is not an
object (400); bodies above the limits (413). Every connection has a read
timeout (408 for a stalled body) and at most ``max_connections`` are served
at once (503 for the others). Clients that go away are no error: nothing is
printed for them.

Errors are JSON ``{"error": "<one line>"}`` with a 4xx/5xx status. Uploads and
jobs live in a private temporary folder removed when the server stops.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlparse

from PIL import Image

from semsr import __version__
from semsr.api import load, load_method
from semsr.core.errors import InputError, SemsrError
from semsr.core.io import picture_to_pil, read_image
from semsr.core.options import MethodOptions, OptionError, closest
from semsr.core.paths import assets_dir
from semsr.methods import resolve
from semsr.ui.catalog import catalogue, find, paths_for, presets
from semsr.ui.jobs import Job, JobQueue, QueueFull

log = logging.getLogger("semsr.ui")

STATIC = Path(__file__).with_name("static")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_PRIOR_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Fields of a job request that are not options of the method.
REQUEST_FIELDS = ("kind", "image", "method", "outscale", "options")
#: Example images offered on the page (one click uses them as an upload): name -> file.
EXAMPLES = {"sample": assets_dir() / "sample.png"}
#: Deepest nesting of a job request (the page sends depth 2).
MAX_JSON_DEPTH = 8
#: Largest job request body.
MAX_JSON_BYTES = 1 << 20
#: Host names served by default (``semsr serve --allow-host`` adds others).
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Content types a cross-site page can send without the browser asking the server first (CORS "simple" requests).
_FORM_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")


def _mb(n: int) -> str:
    """A byte count for people: ``"12.3 MB"``, ``"49 KB"``."""
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


class DemoApp:
    """State of one demo server: settings, uploaded images, the job queue.

    Args:
        paths: weight paths (``base``, ``controlnet``, ``checkpoint``,
            ``vlm``, ``clip``) given to methods that take them; a value is one path
            or ``{method name: path}`` (see :func:`semsr.ui.catalog.paths_for`).
        device, dtype, threads: how methods are built.
        max_upload_bytes: largest accepted upload.
        max_pixels: largest accepted image (width x height).
        max_jobs: most jobs waiting or running at once.
        keep_images: uploads remembered (oldest deleted first).
        default_method: the picker's initial choice.
        max_steps: most sampling steps a job may ask for (options named ``steps`` or ``*_steps``; 0 = the
            methods' own bounds).
        job_timeout: seconds a job may run; it stops at its next step or tile after that (0 = no limit).
    """

    def __init__(
        self,
        paths: Mapping[str, Any] | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        threads: int | None = None,
        max_upload_bytes: int = 20 * 2**20,
        max_pixels: int = 2_000_000,
        max_jobs: int = 8,
        keep_images: int = 32,
        default_method: str = "default",
        max_steps: int = 200,
        job_timeout: float = 1800.0,
    ) -> None:
        self.paths = {k: v for k, v in (paths or {}).items() if v}
        self.device, self.dtype, self.threads = device, dtype, threads
        self.max_upload_bytes, self.max_pixels = int(max_upload_bytes), int(max_pixels)
        self.default_method = default_method
        self.max_steps, self.job_timeout = int(max_steps), float(job_timeout)
        self.workdir = Path(tempfile.mkdtemp(prefix="semsr-serve-"))
        self._images: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._keep_images = keep_images
        self._lock = threading.Lock()
        self._counter = 0
        self._methods: list[dict[str, Any]] | None = None
        self.queue = JobQueue(
            self.run_job, max_jobs=max_jobs, on_forget=self._forget_job, time_limit=self.job_timeout or None
        )

    # ---------------------------------------------------------- info
    def methods(self) -> list[dict[str, Any]]:
        """The picker entries (computed once)."""
        if self._methods is None:
            entries = catalogue(self.paths)
            if self.max_steps:  # the page's bounds are the server's
                for entry in entries:
                    for field in [*entry["common"].values(), *entry["options"]]:
                        if _is_steps(field["dest"], field["type"]):
                            field["max"] = min(field["max"] or self.max_steps, self.max_steps)
                    entry["presets"] = presets(entry["common"])  # within the server's bounds
            self._methods = entries
        return self._methods

    def config(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
            "max_jobs": self.queue.max_jobs,
            "max_steps": self.max_steps,
            "job_timeout": self.job_timeout,
            "default_method": self.default_method,
            "examples": self.examples(),
        }

    def examples(self) -> list[dict[str, Any]]:
        """The example images that exist: ``[{name, width, height}]``."""
        out = []
        for name, path in EXAMPLES.items():
            if path.is_file():
                with Image.open(path) as im:
                    out.append({"name": name, "width": im.width, "height": im.height})
        return out

    def example_path(self, name: str) -> Path:
        """The file of example ``name``; :class:`InputError` for an unknown one."""
        path = EXAMPLES.get(name)
        if path is None or not path.is_file():
            raise InputError(f"unknown example image {_short(name)}")
        return path

    # ---------------------------------------------------------- images
    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}{self._counter}-{int(time.time() * 1000) % 100000:05d}"

    def add_image(self, data: bytes, filename: str = "upload") -> dict[str, Any]:
        """Validate and store an upload; raise :class:`InputError` with a user-facing message."""
        if not data:
            raise InputError("the upload is empty")
        if len(data) > self.max_upload_bytes:
            raise InputError(f"the file is {_mb(len(data))}, above the upload limit of {_mb(self.max_upload_bytes)}")
        image_id = self._new_id("i")
        folder = self.workdir / image_id
        folder.mkdir()
        src = folder / "input.bin"
        src.write_bytes(data)
        try:
            pic = read_image(src, max_pixels=self.max_pixels)
        except InputError as err:
            shutil.rmtree(folder, ignore_errors=True)
            msg = err.message.replace("--max-pixels", "semsr serve --max-pixels")
            raise InputError(f"{_display_name(filename)}: {msg}") from None
        picture_to_pil(pic).save(folder / "preview.png")
        info = {
            "id": image_id,
            "width": pic.width,
            "height": pic.height,
            "name": _display_name(filename),
            "path": str(src),
            "preview": str(folder / "preview.png"),
        }
        with self._lock:
            self._images[image_id] = info
            while len(self._images) > self._keep_images:
                _, old = self._images.popitem(last=False)
                shutil.rmtree(Path(old["path"]).parent, ignore_errors=True)
        return {k: info[k] for k in ("id", "width", "height", "name")}

    def image(self, image_id: str) -> dict[str, Any]:
        with self._lock:
            info = self._images.get(image_id)
        if info is None:
            raise InputError("unknown or expired image; upload it again")
        return info

    # ---------------------------------------------------------- jobs
    def submit(self, body: Mapping[str, Any]) -> Job:
        """Check a job request and queue it."""
        kind = body.get("kind", "upscale")
        if kind not in ("upscale", "priors"):
            raise InputError(f"unknown job kind {_short(kind)}; choose upscale or priors")
        name = body.get("method") or self.default_method
        if not isinstance(name, str):
            raise InputError(f"method must be a method name, got {_short(name)}")
        entry = find(self.methods(), name)
        if entry is None:
            raise InputError(f"unknown method {_short(name)}")
        if not entry["available"]:
            raise InputError(f"method {name} is not available on this server: {entry['reason']}")
        image = body.get("image")
        if not isinstance(image, str) or not image:
            raise InputError(f"image must be the id of an upload, got {_short(image)}")
        self.image(image)  # exists?
        self.options(entry, body)  # validate now: errors answer the request, not the job
        outscale(body.get("outscale"), resolve(name).scale)
        return self.queue.submit(kind, dict(body, method=name))

    def build_values(self, spec: Any) -> dict[str, Any]:
        """The build options the server gives method ``spec``: device, dtype, threads and its weight paths."""
        values: dict[str, Any] = {"device": self.device, "dtype": self.dtype, "threads": self.threads}
        return {**values, **paths_for(spec, self.paths)}

    def options(self, entry: Mapping[str, Any], body: Mapping[str, Any]) -> MethodOptions:
        """The method's options of a job request (see the module doc); :class:`OptionError` when invalid."""
        spec = resolve(entry["name"])
        infos = spec.options.infos()
        raw = body.get("options")
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise InputError(f"options must be a JSON object {{name: value}}, got {_short(raw)}")
        given = dict(raw)
        for key, value in body.items():
            if key in REQUEST_FIELDS:
                continue
            if key not in infos:
                near = closest(key.replace("-", "_"), [*infos, *REQUEST_FIELDS])
                raise OptionError(f"method {spec.name!r} has no option {key}; did you mean {near}?")
            if key in given:
                raise OptionError(f"option {key} is given twice (in the request and in its options)")
            given[key] = value
        values: dict[str, Any] = {}
        for key, value in given.items():
            if value is None or value == "":
                continue
            info = infos.get(str(key))
            if info is not None and info.stage == "build":
                raise OptionError(
                    f"option {key} of method {spec.name!r} is set by the server (semsr serve), not by the page"
                )
            if info is not None and info.widget == "image":
                if not isinstance(value, str):
                    raise OptionError(f"option {key}: expected the id of an upload, got {_short(value)}")
                value = self.image(value)["path"]
            values[str(key)] = value
        values.update(entry.get("forced_options") or {})  # save_* switches: side images are shown as priors
        options = spec.parse({**self.build_values(spec), **values})
        if self.max_steps:
            for name, info in infos.items():
                value = getattr(options, name)
                if _is_steps(name, info.kind) and value is not None and value > self.max_steps:
                    raise OptionError(
                        f"option {name}: at most {self.max_steps} on this server (semsr serve --max-steps), got {value}"
                    )
        return options

    def run_job(self, job: Job) -> dict[str, Any]:
        """The queue's runner: build the pipeline (cached) and run it."""
        body = job.params
        entry = find(self.methods(), body["method"])
        assert entry is not None
        options = self.options(entry, body)
        info = self.image(str(body["image"]))
        spec = resolve(entry["name"])
        job.progress("load", 0, 0)
        # build first through load_method: its errors name semsr serve's flags (--checkpoint PATH), which is
        # what the server's operator passes; load then wraps the cached method without building again
        load_method(spec.name, options)
        pipe = load(spec.name, options)
        job.check()
        pic = read_image(info["path"], max_pixels=self.max_pixels)
        if job.kind == "priors":
            job.progress("priors", 0, 0)
            priors = pipe.suggest_priors(pic)
            return {"priors": _json_priors(priors, None)}
        job.progress("upscale", 0, 0)
        factor = outscale(body.get("outscale"), spec.scale)
        result = pipe(pic, options, outscale=factor, on_progress=job.progress)
        folder = self.workdir / job.id
        folder.mkdir(exist_ok=True)
        result.image.save(folder / "result.png")
        prior_images = {}
        for key, value in result.priors.items():
            if isinstance(value, Image.Image) and _PRIOR_NAME.match(key):
                value.save(folder / f"prior-{key}.png")
                prior_images[key] = f"/api/jobs/{job.id}/prior/{key}"
        return {
            "width": result.image.width,
            "height": result.image.height,
            "method": spec.name,
            "scale": spec.scale,
            "outscale": factor if factor is not None else spec.scale,
            "timings": {k: round(v, 3) for k, v in result.timings.items()},
            "priors": _json_priors(result.priors, prior_images),
            "options": _json_options(options.changed("run")),
            "filename": f"{Path(info['name']).stem or 'image'}_{spec.name}_x{factor or spec.scale:g}.png",
        }

    def job_status(self, job: Job) -> dict[str, Any]:
        """The JSON the page polls."""
        now = time.time()
        return {
            "id": job.id,
            "kind": job.kind,
            "state": job.state,
            "position": self.queue.position(job),
            "stage": job.stage,
            "done": job.done,
            "total": job.total,
            "message": job.message,
            "elapsed": round((job.finished or now) - (job.started or now), 2),
            "output": job.output if job.state == "done" else None,
        }

    def _forget_job(self, job: Job) -> None:
        shutil.rmtree(self.workdir / job.id, ignore_errors=True)

    def close(self) -> None:
        self.queue.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def outscale(value: Any, scale: int) -> float | None:
    """The job's ``outscale`` field: ``None`` (the method's ``scale``) or a factor in ``(0, scale]``;
    :class:`OptionError` for anything else."""
    if value is None or value == "":
        return None
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not (0 < number <= scale):
        raise OptionError(
            f"outscale: expected a factor above 0 and at most the method's scale {scale}, got {_short(value)}"
        )
    return None if number == scale else number


def _is_steps(name: str, kind: str) -> bool:
    """An integer option counting sampling steps (capped by ``semsr serve --max-steps``)."""
    return kind == "int" and (name == "steps" or name.endswith("_steps"))


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (error messages echo client input)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename`` and the exact name as RFC 5987 ``filename*`` (RFC 6266)."""
    decomposed = unicodedata.normalize("NFKD", filename)  # "é" -> "e" + accent (dropped)
    plain = "".join(
        c if c.isascii() and (c.isalnum() or c in "._ -") else "_" for c in decomposed if not unicodedata.combining(c)
    )
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _display_name(name: str) -> str:
    name = Path(str(name).replace("\\", "/")).name
    return re.sub(r"[^\w.\- ]", "_", name)[:80] or "upload"


def _json_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """Option values for the page (paths, e.g. an uploaded reference's, left out)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, tuple):
            out[key] = list(value)
        elif isinstance(value, (str, int, float, bool, dict)) or value is None:
            out[key] = value
    return out


def _json_priors(priors: Mapping[str, Any], image_urls: Mapping[str, str] | None) -> dict[str, Any]:
    """Priors for the page: text/tags/numbers as is, images as URLs (or dropped)."""
    out: dict[str, Any] = {}
    for key, value in priors.items():
        if isinstance(value, Image.Image):
            if image_urls and key in image_urls:
                out[key] = {"image": image_urls[key]}
        elif isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
        elif isinstance(value, (tuple, list)):
            out[key] = [v if isinstance(v, (str, int, float, bool)) else str(v) for v in value]
        elif isinstance(value, Mapping):
            out[key] = _json_priors(value, None)
        else:
            out[key] = str(value)
    return out


class _Refused(Exception):
    """A request answered with ``status`` and a one-line ``message`` (the connection is then closed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _ClientGone(Exception):
    """The client closed the connection in the middle of a request: nothing to answer."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any) -> int:
    """How deeply ``value`` (parsed JSON) nests lists and objects (a scalar is 0)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _host_name(value: str) -> str:
    """The host name of a ``Host`` header or URL netloc, lower case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the :class:`DemoApp` in ``server.app`` (after the checks in the module doc)."""

    server_version = f"semsr/{__version__}"
    protocol_version = "HTTP/1.1"
    server: DemoServer

    @property
    def app(self) -> DemoApp:
        return self.server.app

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # every read and write of this connection
        super().setup()

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    # ---------------------------------------------------------- replies
    def _send(self, status: int, body: bytes, ctype: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        """``{"error": message}``: one line, at most 240 characters (messages may echo client input)."""
        message = " ".join(message.split())
        self._json(status, {"error": message if len(message) <= 240 else message[:237] + "..."})

    def _file(self, path: Path, ctype: str | None = None, download: str | None = None) -> None:
        if not path.is_file():
            self._error(404, "not found (the result may have expired)")
            return
        headers = {"Content-Disposition": content_disposition(download)} if download else None
        ctype = ctype or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._send(200, path.read_bytes(), ctype, headers)

    # ---------------------------------------------------------- checks and bodies
    def _check_host_and_origin(self) -> None:
        """Raise :class:`_Refused` (403) for a ``Host`` or ``Origin`` this server does not serve."""
        host = self.headers.get("Host")
        if host is None:
            raise _Refused(400, "the request has no Host header")
        allowed = self.server.allowed_hosts
        if "*" not in allowed and _host_name(host) not in allowed:
            raise _Refused(
                403, f"host {_short(_host_name(host))} is not served here (semsr serve --allow-host NAME adds one)"
            )
        origin = self.headers.get("Origin")
        if origin is None:
            return
        origins = self.server.allowed_origins
        url = urlparse(origin.strip().lower())
        same = url.scheme in ("http", "https") and url.netloc == host.strip().lower()
        if not (same or "*" in origins or origin.strip().lower().rstrip("/") in origins):
            raise _Refused(
                403, f"requests from {_short(origin)} are not accepted (semsr serve --allow-origin URL adds one)"
            )

    def _read_body(self, limit: int, what: str, limit_name: str) -> bytes:
        """The request body (``Content-Length`` or chunked), at most ``limit`` bytes.

        Raises:
            _Refused: 413 above ``limit``, 400 for a malformed length or chunk, 408 when the client stalls.
            _ClientGone: the client closed the connection before the whole body arrived.
        """
        try:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                return self._read_chunked(limit, what, limit_name)
            if self.headers.get("Transfer-Encoding"):
                raise _Refused(501, f"Transfer-Encoding {_short(self.headers['Transfer-Encoding'])} is not supported")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                raise _Refused(400, "bad Content-Length")
            if length > limit:
                self._drain(length, limit)
                raise _Refused(413, f"{what} is {_mb(length)}, above {limit_name} of {_mb(limit)}")
            data = self.rfile.read(length)
            if len(data) < length:
                raise _ClientGone
            return data
        except TimeoutError:
            raise _Refused(408, f"{what} stalled: nothing arrived for {self.timeout:g} s") from None

    def _drain(self, length: int, limit: int) -> None:
        """Read a bounded amount of a refused body so the browser sees the reply rather than a reset."""
        remaining = length
        while 0 < remaining <= 8 * limit:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)

    def _read_chunked(self, limit: int, what: str, limit_name: str) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise _ClientGone
            try:
                n = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _Refused(400, "bad chunk size in a chunked body") from None
            if n < 0:
                raise _Refused(400, "bad chunk size in a chunked body")
            if n == 0:
                break
            size += n
            if size > limit:
                raise _Refused(413, f"{what} is above {limit_name} of {_mb(limit)}")
            data = self.rfile.read(n)
            if len(data) < n:
                raise _ClientGone
            parts.append(data)
            if self.rfile.read(2) != b"\r\n":
                raise _Refused(400, "bad chunk end in a chunked body")
        for _ in range(100):  # trailer fields, then the blank line
            if self.rfile.readline(65536) in (b"\r\n", b"\n", b""):
                break
        return b"".join(parts)

    def _json_body(self) -> dict[str, Any]:
        """The job request: ``Content-Type: application/json``, UTF-8, an object, nesting at most
        :data:`MAX_JSON_DEPTH` levels; :class:`_Refused` otherwise."""
        ctype = self.headers.get_content_type()
        if ctype != "application/json" or not self.headers.get("Content-Type"):
            raise _Refused(415, f"a job request must be Content-Type: application/json, not {ctype}")
        raw = self._read_body(MAX_JSON_BYTES, "the request", "the limit for a job request")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _Refused(400, f"the request is not UTF-8 (byte {err.start})") from None
        try:
            body = json.loads(text or "{}", parse_constant=_no_constant)
        except RecursionError:
            raise _Refused(400, f"the request nests deeper than {MAX_JSON_DEPTH} levels") from None
        except ValueError as err:
            raise _Refused(400, f"the request is not JSON: {str(err).splitlines()[0]}") from None
        if _depth(body) > MAX_JSON_DEPTH:
            raise _Refused(400, f"the request nests deeper than {MAX_JSON_DEPTH} levels")
        if not isinstance(body, dict):
            raise _Refused(400, f"the request must be a JSON object, got {type(body).__name__}")
        return body

    def _dispatch(self, route: Any) -> None:
        """Run ``route()`` after the host/origin check; turn errors into one-line answers."""
        try:
            self._check_host_and_origin()
            route()
        except _Refused as err:
            self.close_connection = True  # the rest of a refused request may still be on its way
            self._error(err.status, err.message)
        except _ClientGone:
            self.close_connection = True
        except QueueFull as err:
            self._error(503, err.message)
        except SemsrError as err:
            self._error(404 if self.command in ("GET", "HEAD") else 400, err.message)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as err:
            log.error("%s %s failed:\n%s", self.command, self.path, traceback.format_exc())
            self.close_connection = True
            self._error(500, f"internal error: {type(err).__name__}")

    # ---------------------------------------------------------- routes
    def do_HEAD(self) -> None:
        self._dispatch(self._get)

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def do_DELETE(self) -> None:
        self._dispatch(self._delete)

    def _get(self) -> None:
        url = urlparse(self.path)
        parts = [p for p in url.path.split("/") if p]
        if not parts or parts == ["index.html"]:
            self._file(STATIC / "index.html", "text/html; charset=utf-8")
        elif parts[0] == "static" and len(parts) == 2 and _PRIOR_NAME.match(parts[1]):
            self._file(STATIC / parts[1])
        elif parts == ["api", "config"]:
            self._json(200, self.app.config())
        elif parts == ["api", "methods"]:
            self._json(200, self.app.methods())
        elif len(parts) == 3 and parts[:2] == ["api", "images"] and _ID.match(parts[2]):
            self._file(Path(self.app.image(parts[2])["preview"]), "image/png")
        elif len(parts) == 3 and parts[:2] == ["api", "examples"] and _ID.match(parts[2]):
            self._file(self.app.example_path(parts[2]), "image/png")
        elif len(parts) >= 3 and parts[:2] == ["api", "jobs"] and _ID.match(parts[2]):
            self._get_job(parts[2], parts[3:], parse_qs(url.query))
        elif parts == ["favicon.ico"]:
            self._send(204, b"", "image/x-icon")
        else:
            self._error(404, "not found")

    def _get_job(self, job_id: str, rest: list[str], query: dict[str, list[str]]) -> None:
        job = self.app.queue.get(job_id)
        if job is None:
            self._error(404, "unknown or expired job")
            return
        if not rest:
            self._json(200, self.app.job_status(job))
        elif rest == ["result"] and job.state == "done" and "filename" in job.output:
            download = job.output["filename"] if query.get("download") else None
            self._file(self.app.workdir / job.id / "result.png", "image/png", download)
        elif len(rest) == 2 and rest[0] == "prior" and _PRIOR_NAME.match(rest[1]):
            self._file(self.app.workdir / job.id / f"prior-{rest[1]}.png", "image/png")
        else:
            self._error(404, "not found (job not finished?)")

    def _post(self) -> None:
        parts = [p for p in urlparse(self.path).path.split("/") if p]
        if parts == ["api", "images"]:
            ctype = self.headers.get_content_type()
            if self.headers.get("Content-Type") and ctype in _FORM_TYPES:
                raise _Refused(
                    415, f"send the image as the raw body (Content-Type: application/octet-stream), not {ctype}"
                )
            data = self._read_body(self.app.max_upload_bytes, "the file", "the upload limit")
            name = unquote(self.headers.get("X-Filename") or "upload")
            self._json(201, self.app.add_image(data, name))
        elif len(parts) == 3 and parts[:2] == ["api", "examples"] and _ID.match(parts[2]):
            self._json_body()  # JSON only, like a job: a cross-site form cannot post it
            path = self.app.example_path(parts[2])
            self._json(201, self.app.add_image(path.read_bytes(), path.name))
        elif parts == ["api", "jobs"]:
            job = self.app.submit(self._json_body())
            self._json(202, {"id": job.id, "position": self.app.queue.position(job)})
        else:
            raise _Refused(404, "not found")

    def _delete(self) -> None:
        parts = [p for p in urlparse(self.path).path.split("/") if p]
        if len(parts) != 3 or parts[:2] != ["api", "jobs"] or self.app.queue.get(parts[2]) is None:
            self._error(404, "unknown or expired job")
            return
        outcome = self.app.queue.cancel(parts[2])
        if outcome == "cancelled":
            self._json(200, {"id": parts[2], "state": "cancelled"})
        elif outcome == "cancelling":
            self._json(202, {"id": parts[2], "state": "running", "cancelling": True})
        else:
            self._error(409, "the job has already finished")


class DemoServer(ThreadingHTTPServer):
    """A threading HTTP server holding a :class:`DemoApp`.

    Args:
        address: ``(host, port)`` to bind (port 0 = any free port).
        app: the demo's state.
        allowed_hosts: ``Host`` names served besides :data:`LOCAL_HOSTS` and the bound address
            (``"*"`` = any).
        allowed_origins: ``Origin`` values accepted besides the page's own (``"*"`` = any).
        request_timeout: seconds a connection may stay silent (while sending a request or between requests).
        max_connections: connections served at once (one thread each); more are answered 503 at once.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        app: DemoApp,
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
        request_timeout: float = 30.0,
        max_connections: int = 32,
    ) -> None:
        self.app = app  # before binding: a failed bind calls server_close()
        bound = () if address[0] in ("", "0.0.0.0", "::") else (address[0],)
        self.allowed_hosts = {_host_name(h) if h != "*" else h for h in (*LOCAL_HOSTS, *bound, *allowed_hosts)}
        self.allowed_origins = {o.strip().lower().rstrip("/") for o in allowed_origins}
        self.request_timeout = float(request_timeout)
        self.max_connections = int(max_connections)
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse_busy(self, request: socket.socket) -> None:
        """Answer 503 on the accepting thread (no thread is started) and close."""
        body = json.dumps({"error": f"the server is busy ({self.max_connections} connections); try again"}).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 5\r\n\r\n"
        )
        try:
            request.settimeout(0.05)
            try:
                request.recv(65536)  # the request, if it has arrived: closing with it unread would reset
            except OSError:
                pass
            request.sendall(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away or stalled is no error; anything else is logged once."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            log.debug("client %s went away", client_address[0])
            return
        log.error("request from %s failed:\n%s", client_address[0], traceback.format_exc())

    def server_close(self) -> None:
        super().server_close()
        self.app.close()


_SERVER_OPTIONS = ("allowed_hosts", "allowed_origins", "request_timeout", "max_connections")


def make_server(host: str = "127.0.0.1", port: int = 7860, **opts: Any) -> DemoServer:
    """Bind a :class:`DemoServer` (``port=0`` picks a free port); call ``serve_forever()``.

    ``opts``: :class:`DemoServer`'s ``allowed_hosts``, ``allowed_origins``, ``request_timeout``,
    ``max_connections``; the rest go to :class:`DemoApp`.
    """
    server_opts = {k: opts.pop(k) for k in _SERVER_OPTIONS if k in opts}
    return DemoServer((host, port), DemoApp(**opts), **server_opts)
