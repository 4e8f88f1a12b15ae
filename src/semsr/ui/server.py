"""The web demo's HTTP server: standard-library ``http.server``, no CDN, no analytics.

The page (``static/index.html``, ``app.js``, ``app.css``) talks to a small JSON API:

==========================  ===================================================
``GET  /``                  the page
``GET  /api/config``        limits (upload bytes, pixels, queue) and defaults
``GET  /api/methods``       the method picker (:func:`semsr.ui.catalog.catalogue`)
``POST /api/images``        upload one image (raw request body) -> ``{id, width, height}``
``GET  /api/images/<id>``   the uploaded image as PNG
``POST /api/jobs``          JSON ``{kind: "upscale"|"priors", image, method, ...}`` -> ``{id, position}``
``GET  /api/jobs/<id>``     state, queue position, progress, output
``DELETE /api/jobs/<id>``   cancel a queued job
``GET  /api/jobs/<id>/result[?download=1]``  full-resolution PNG
``GET  /api/jobs/<id>/prior/<name>``         an image prior the method used
==========================  ===================================================

A job's options are validated by the method's options class
(:meth:`semsr.core.method.MethodSpec.parse`) when it is submitted: the fixed
fields (``prompt``, ``negative_prompt``, ``steps``, ``guidance_scale``,
``seed``, ``colour_fix``, ``tile``, ``priors_in_prompt``) and the method's own
(``options``: ``{name: value}``); numbers, text and booleans are read as the
parser reads them (``"3"`` and ``3`` alike), ``null`` and ``""`` mean "the
default", an image option holds an upload id. An unknown option, a build
option (those come from the ``semsr serve`` command line) or a bad value is a
400 answer with the one-line reason.

Errors are JSON ``{"error": "<one line>"}`` with a 4xx/5xx status. Uploads and
jobs live in a private temporary folder removed when the server stops.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from PIL import Image

from semsr import __version__
from semsr.api import load
from semsr.core.errors import InputError, SemsrError
from semsr.core.io import picture_to_pil, read_image
from semsr.core.options import MethodOptions, OptionError
from semsr.methods import resolve
from semsr.priors.report import PRIORS_IN_PROMPT
from semsr.ui.catalog import COMMON_FIELDS, catalogue, find, paths_for
from semsr.ui.jobs import Job, JobQueue, QueueFull

log = logging.getLogger("semsr.ui")

STATIC = Path(__file__).with_name("static")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_PRIOR_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


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
    ) -> None:
        self.paths = {k: v for k, v in (paths or {}).items() if v}
        self.device, self.dtype, self.threads = device, dtype, threads
        self.max_upload_bytes, self.max_pixels = int(max_upload_bytes), int(max_pixels)
        self.default_method = default_method
        self.workdir = Path(tempfile.mkdtemp(prefix="semsr-serve-"))
        self._images: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._keep_images = keep_images
        self._lock = threading.Lock()
        self._counter = 0
        self._methods: list[dict[str, Any]] | None = None
        self.queue = JobQueue(self.run_job, max_jobs=max_jobs, on_forget=self._forget_job)

    # ---------------------------------------------------------- info
    def methods(self) -> list[dict[str, Any]]:
        """The picker entries (computed once)."""
        if self._methods is None:
            self._methods = catalogue(self.paths)
        return self._methods

    def config(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
            "max_jobs": self.queue.max_jobs,
            "default_method": self.default_method,
        }

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
            raise InputError(f"unknown job kind {kind!r}")
        name = str(body.get("method") or self.default_method)
        entry = find(self.methods(), name)
        if entry is None:
            raise InputError(f"unknown method {name!r}")
        if not entry["available"]:
            raise InputError(f"method {name} is not available on this server: {entry['reason']}")
        self.image(str(body.get("image", "")))  # exists?
        self.options(entry, body)  # validate now: errors answer the request, not the job
        return self.queue.submit(kind, dict(body, method=name))

    def build_values(self, spec: Any) -> dict[str, Any]:
        """The build options the server gives method ``spec``: device, dtype, threads and its weight paths."""
        values: dict[str, Any] = {"device": self.device, "dtype": self.dtype, "threads": self.threads}
        return {**values, **paths_for(spec, self.paths)}

    def options(self, entry: Mapping[str, Any], body: Mapping[str, Any]) -> MethodOptions:
        """The method's options of a job request (see the module doc); :class:`OptionError` when invalid."""
        spec = resolve(entry["name"])
        infos = spec.options.infos()
        raw = body.get("options") or {}
        if not isinstance(raw, Mapping):
            raise InputError("options must be a JSON object")
        given = dict(raw)
        for key in (*COMMON_FIELDS, "tile", PRIORS_IN_PROMPT):
            if key in body:
                given[key] = body[key]
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
                value = self.image(str(value))["path"]
            values[str(key)] = value
        values.update(entry.get("forced_options") or {})  # save_* switches: side images are shown as priors
        return spec.parse({**self.build_values(spec), **values})

    def run_job(self, job: Job) -> dict[str, Any]:
        """The queue's runner: build the pipeline (cached) and run it."""
        body = job.params
        entry = find(self.methods(), body["method"])
        assert entry is not None
        options = self.options(entry, body)
        info = self.image(str(body["image"]))
        spec = resolve(entry["name"])
        job.progress("load", 0, 0)
        pipe = load(spec.name, options)
        pic = read_image(info["path"], max_pixels=self.max_pixels)
        if job.kind == "priors":
            job.progress("priors", 0, 0)
            priors = pipe.suggest_priors(pic)
            return {"priors": _json_priors(priors, None)}
        job.progress("upscale", 0, 0)
        result = pipe(pic, options, on_progress=job.progress)
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
            "timings": {k: round(v, 3) for k, v in result.timings.items()},
            "priors": _json_priors(result.priors, prior_images),
            "options": _json_options(options.changed("run")),
            "filename": f"{Path(info['name']).stem or 'image'}_{spec.name}_x{spec.scale}.png",
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


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the :class:`DemoApp` in ``server.app``."""

    server_version = f"semsr/{__version__}"
    protocol_version = "HTTP/1.1"

    @property
    def app(self) -> DemoApp:
        return self.server.app  # type: ignore[attr-defined]

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
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _file(self, path: Path, ctype: str | None = None, download: str | None = None) -> None:
        if not path.is_file():
            self._error(404, "not found (the result may have expired)")
            return
        headers = {"Content-Disposition": f'attachment; filename="{download}"'} if download else None
        ctype = ctype or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._send(200, path.read_bytes(), ctype, headers)

    def _read_body(self, limit: int) -> bytes | None:
        """The request body, or ``None`` (after replying 413) when it is above ``limit``."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._error(400, "bad Content-Length")
            return None
        if length > limit:
            # Drain a bounded amount so the browser sees the reply rather than a reset.
            remaining = length
            while remaining > 0 and remaining <= 8 * limit:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)
            if remaining > 0:
                self.close_connection = True
            self._error(413, f"the file is {_mb(length)}, above the upload limit of {_mb(limit)}")
            return None
        return self.rfile.read(length)

    # ---------------------------------------------------------- routes
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlparse(self.path)
        parts = [p for p in url.path.split("/") if p]
        try:
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
            elif len(parts) >= 3 and parts[:2] == ["api", "jobs"] and _ID.match(parts[2]):
                self._get_job(parts[2], parts[3:], parse_qs(url.query))
            elif parts == ["favicon.ico"]:
                self._send(204, b"", "image/x-icon")
            else:
                self._error(404, "not found")
        except SemsrError as err:
            self._error(404, err.message)

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

    def do_POST(self) -> None:
        parts = [p for p in urlparse(self.path).path.split("/") if p]
        try:
            if parts == ["api", "images"]:
                data = self._read_body(self.app.max_upload_bytes)
                if data is None:
                    return
                name = unquote(self.headers.get("X-Filename") or "upload")
                self._json(201, self.app.add_image(data, name))
            elif parts == ["api", "jobs"]:
                raw = self._read_body(1 << 20)
                if raw is None:
                    return
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    self._error(400, "the request is not JSON")
                    return
                if not isinstance(body, dict):
                    self._error(400, "the request must be a JSON object")
                    return
                job = self.app.submit(body)
                self._json(202, {"id": job.id, "position": self.app.queue.position(job)})
            else:
                self._error(404, "not found")
        except QueueFull as err:
            self._error(503, err.message)
        except SemsrError as err:
            self._error(400, err.message)

    def do_DELETE(self) -> None:
        parts = [p for p in urlparse(self.path).path.split("/") if p]
        if len(parts) == 3 and parts[:2] == ["api", "jobs"] and self.app.queue.cancel(parts[2]):
            self._json(200, {"cancelled": parts[2]})
        else:
            self._error(409, "only queued jobs can be cancelled")


class DemoServer(ThreadingHTTPServer):
    """A threading HTTP server holding a :class:`DemoApp`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: DemoApp) -> None:
        self.app = app  # before binding: a failed bind calls server_close()
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def server_close(self) -> None:
        super().server_close()
        self.app.close()


def make_server(host: str = "127.0.0.1", port: int = 7860, **app_opts: Any) -> DemoServer:
    """Bind a :class:`DemoServer` (``port=0`` picks a free port); call ``serve_forever()``."""
    return DemoServer((host, port), DemoApp(**app_opts))
