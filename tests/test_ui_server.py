"""The web demo's HTTP API without a browser: start-up, endpoints, limits, queue."""

from __future__ import annotations

import io
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from _ui_helpers import serve
from semsr.core.options import MethodOptions, option
from semsr.core.outputs import SROutput
from semsr.methods import MethodSpec, register, resolve
from semsr.methods.default_diffusion import packaged_weights
from semsr.ui.catalog import catalogue, find, path_options, required_paths
from semsr.ui.server import DemoApp, make_server

GATE = threading.Event()
SEEN: list[Any] = []


@dataclass(kw_only=True, frozen=True)
class GatedOptions(MethodOptions):
    """Options of ``test-ui-gated``: the common fields, a choice, a slider, an image, switches, a build option."""

    prompt: str = option("", help="prompt")
    steps: int = option(20, min=1, max=1000, help="steps")
    seed: int = option(0, min=0, help="seed")
    guidance_scale: float = option(1.0, min=0, max=100, help="guidance")
    mode: str = option("x", choices=("x", "y"), help="a choice")
    temp_depth: float = option(1.0, min=0, max=2, step=0.05, widget="slider", help="a slider")
    reference: Path | None = option(None, widget="image", help="an image upload")
    flag: bool = option(False, help="a switch")
    weights_dir: Path | None = option(None, stage="build", help="a build option")
    save_extra: bool = option(False, help="a side image")
    secret: str = option("", hidden=True, help="not on the page")
    priors_in_prompt: bool = option(False, help="the prompt holds the suggested priors")


class _Gated:
    """2x nearest method that waits for GATE (to hold the queue) and records its options."""

    name, scale, tiles_itself = "test-ui-gated", 2, True

    def __call__(self, x: torch.Tensor, options: GatedOptions | None = None, *, progress: Any = False) -> SROutput:
        assert GATE.wait(30)
        SEEN.append(options)
        priors = {"prompt": options.prompt, "map": torch.full((1, 1, 3, 3), 0.5)}
        return SROutput(
            x.repeat_interleave(2, 2).repeat_interleave(2, 3),
            priors=priors,
            side_images={"extra": torch.zeros(1, 3, 4, 4)},
        )

    def suggest_priors(self, x: torch.Tensor) -> dict[str, Any]:
        return {"prompt": "a suggested prompt", "tags": ("a", "b")}


register(MethodSpec("test-ui-gated", lambda _options: _Gated(), GatedOptions, 2, "test method", suggests_priors=True))


def _png(w: int = 6, h: int = 5, flat: bool = False) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr * 0 if flat else arr).save(buf, "PNG")
    return buf.getvalue()


def _req(url: str, data: bytes | dict | None = None, method: str | None = None, headers: dict | None = None):
    """``(status, body bytes, headers)`` of a request (errors included); a dict is sent as JSON."""
    headers = dict(headers or {})
    if isinstance(data, dict):
        data = json.dumps(data).encode()
        headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def _json(url: str, data: bytes | dict | None = None, method: str | None = None) -> tuple[int, Any]:
    status, body, _ = _req(url, data, method)
    return status, json.loads(body)


def _wait(url: str, job: str, states: tuple[str, ...] = ("done", "error"), timeout: float = 30) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        _, st = _json(f"{url}api/jobs/{job}")
        if st["state"] in states:
            return st
        time.sleep(0.05)
    raise AssertionError(f"job {job} stuck: {st}")


@pytest.fixture()
def server():
    GATE.set()
    SEEN.clear()
    srv = make_server("127.0.0.1", 0, max_upload_bytes=50_000, max_pixels=10_000, max_jobs=2)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv.url
    GATE.set()
    srv.shutdown()
    srv.server_close()


def _upload(url: str, data: bytes, name: str = "a.png") -> tuple[int, Any]:
    status, body, _ = _req(
        url + "api/images", data, headers={"X-Filename": name, "Content-Type": "application/octet-stream"}
    )
    return status, json.loads(body)


def test_serve_command_answers_within_60s():
    with serve("--max-jobs", "1") as (url, seconds):
        assert seconds < 60
        status, body, headers = _req(url)
        assert status == 200 and b"semsr" in body and headers["Content-Type"].startswith("text/html")
        for path in ("static/app.js", "static/app.css", "api/config", "api/methods"):
            assert _req(url + path)[0] == 200, path
        assert _json(url + "api/config")[1]["max_jobs"] == 1


def test_page_has_no_external_assets(server):
    for path in ("", "static/app.js", "static/app.css"):
        text = _req(server + path)[1].decode()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path


def test_methods_catalogue_from_registry(server):
    status, methods = _json(server + "api/methods")
    by = {m["name"]: m for m in methods}
    assert status == 200 and by["bicubic"]["available"] and by["default"]["available"]
    assert not by["sd-controlnet"]["available"] and "--base" in by["sd-controlnet"]["reason"]
    # packaged weights: --checkpoint is optional for the shipped model, still passed on when given
    assert by["default-diffusion"]["available"] and by["default-diffusion"]["missing_paths"] == []
    assert required_paths(resolve("default-diffusion")) == []
    assert path_options(resolve("default-diffusion")) == ["checkpoint", "irpad"]
    assert required_paths(resolve("realesrgan-pth")) == ["checkpoint"]
    assert by["sd-controlnet"]["diffusion"] and not by["bicubic"]["diffusion"]
    assert by["default"]["diffusion"] and by["default-diffusion"]["diffusion"]  # prompt, steps, seed on the page
    gated = by["test-ui-gated"]
    opts = {o["dest"]: o for o in gated["options"]}
    # run options only (build options stay server-side), not hidden ones, not the fixed fields;
    # save_* switches are always on (their side images are shown)
    assert set(opts) == {"mode", "temp_depth", "reference", "flag"}
    assert set(gated["common"]) == {"prompt", "steps", "seed", "guidance_scale"}
    assert gated["common"]["steps"]["min"] == 1 and gated["common"]["steps"]["default"] == 20
    assert gated["forced_options"] == {"save_extra": True} and gated["priors_in_prompt"]
    assert gated["suggests_priors"] and not by["bicubic"]["suggests_priors"]
    assert opts["mode"]["widget"] == "select" and opts["mode"]["choices"] == ["x", "y"]
    assert opts["temp_depth"]["widget"] == "slider" and opts["temp_depth"]["max"] == 2
    assert opts["temp_depth"]["step"] == 0.05 and opts["temp_depth"]["default"] == 1.0
    assert opts["reference"]["widget"] == "image" and opts["flag"]["widget"] == "checkbox"
    assert opts["flag"]["default"] is False and "a switch" in opts["flag"]["help"]
    bicubic = by["bicubic"]
    assert bicubic["common"] == {} and [o["dest"] for o in bicubic["options"]] == []  # scale: a build option
    assert set(by["sd-controlnet"]["common"]) == {
        "prompt",
        "negative_prompt",
        "steps",
        "guidance_scale",
        "seed",
        "colour_fix",
    }
    assert by["sd-controlnet"]["colour_fixes"] == ["adain", "wavelet", "none"]


def test_upload_run_download(server):
    status, img = _upload(server, _png(), "my photo.png")
    assert status == 201 and (img["width"], img["height"]) == (6, 5) and img["name"] == "my photo.png"
    status, _, headers = _req(f"{server}api/images/{img['id']}")
    assert status == 200 and headers["Content-Type"] == "image/png"
    status, job = _json(server + "api/jobs", {"image": img["id"], "method": "bicubic", "tile": "0"})
    assert status == 202
    st = _wait(server, job["id"])
    assert st["state"] == "done", st
    out = st["output"]
    assert (out["width"], out["height"]) == (24, 20) and out["priors"] == {} and out["timings"]["upscale"] >= 0
    status, body, headers = _req(f"{server}api/jobs/{job['id']}/result?download=1")
    assert status == 200 and 'filename="my photo_bicubic_x4.png"' in headers["Content-Disposition"]
    assert Image.open(io.BytesIO(body)).size == (24, 20)


def test_bad_uploads_have_clear_messages(server):
    status, err = _upload(server, b"this is not an image", "notes.txt")
    assert status == 400 and err["error"].startswith("notes.txt: not a readable image")
    status, err = _upload(server, b"", "empty.png")
    assert status == 400 and "empty" in err["error"]
    status, err = _upload(server, b"\0" * 60_000, "big.png")
    assert status == 413 and err["error"] == "the file is 59 KB, above the upload limit of 49 KB"
    status, err = _upload(server, _png(200, 100, flat=True), "huge.png")
    assert status == 400 and "200x100" in err["error"] and "semsr serve --max-pixels" in err["error"]


def test_bad_job_requests(server):
    _, img = _upload(server, _png())
    cases = [
        ({"image": img["id"], "method": "nope"}, "unknown method"),
        ({"image": img["id"], "method": "sd-controlnet"}, "not available"),
        ({"image": "i999-00000", "method": "bicubic"}, "upload it again"),
        ({"image": img["id"], "method": "test-ui-gated", "options": {"mode": "z"}}, "choose one of x, y"),
        (
            {"image": img["id"], "method": "test-ui-gated", "options": {"temp_depth": "hot"}},
            "option temp_depth: expected a number, got 'hot'",
        ),
        (
            {"image": img["id"], "method": "test-ui-gated", "options": {"weights_dir": "/x"}},
            "option weights_dir of method 'test-ui-gated' is set by the server",
        ),
        (
            {"image": img["id"], "method": "test-ui-gated", "options": {"stepz": 3}},
            "method 'test-ui-gated' has no option stepz; did you mean steps?",
        ),
        ({"image": img["id"], "method": "bicubic", "prompt": "a cat"}, "method 'bicubic' has no option prompt"),
        ({"image": img["id"], "method": "bicubic", "tile": "abc"}, "option tile: expected an integer, got 'abc'"),
        ({"image": img["id"], "method": "test-ui-gated", "steps": 1.5}, "option steps: expected an integer, got 1.5"),
        ({"image": img["id"], "method": "test-ui-gated", "steps": 1e30}, "option steps: must be <= 1000, got 1e+30"),
        ({"image": img["id"], "method": "test-ui-gated", "seed": "1e30"}, "option seed: expected an integer"),
        ({"image": img["id"], "method": "test-ui-gated", "options": {"reference": "i999-00000"}}, "upload it again"),
        ({"image": img["id"], "method": "test-ui-gated", "options": ["mode"]}, "options must be a JSON object"),
        ({"image": img["id"], "method": "bicubic", "kind": "train"}, "unknown job kind"),
    ]
    for body, expected in cases:
        status, err = _json(server + "api/jobs", body)
        assert status == 400 and expected in err["error"] and "\n" not in err["error"], (body, err)
    status, _, _ = _req(server + "api/jobs", b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400


def test_queue_one_at_a_time_positions_full_and_cancel(server):
    _, img = _upload(server, _png())
    _, ref = _upload(server, _png(3, 3), "ref.png")
    GATE.clear()
    body = {
        "image": img["id"],
        "method": "test-ui-gated",
        "prompt": "a cat",
        "steps": "3",
        "seed": "",
        "priors_in_prompt": True,
        "tile": "",
        "options": {"mode": "y", "temp_depth": "0.5", "reference": ref["id"], "flag": True},
    }
    _, a = _json(server + "api/jobs", body)
    _wait(server, a["id"], ("running",))
    _, b = _json(server + "api/jobs", body)
    assert b["position"] == 1
    status, err = _json(server + "api/jobs", body)
    assert status == 503 and "queue is full" in err["error"]
    assert _json(f"{server}api/jobs/{b['id']}")[1]["state"] == "queued"
    assert _json(f"{server}api/jobs/{b['id']}", method="DELETE") == (200, {"id": b["id"], "state": "cancelled"})
    GATE.set()
    st = _wait(server, a["id"])
    assert st["state"] == "done", st
    assert _json(f"{server}api/jobs/{b['id']}")[1]["state"] == "cancelled"
    assert len(SEEN) == 1
    opts = SEEN[0]
    assert isinstance(opts, GatedOptions)
    assert opts.prompt == "a cat" and opts.steps == 3 and opts.mode == "y" and opts.temp_depth == 0.5
    assert opts.flag is True and opts.reference.name == "input.bin"  # the uploaded reference's file
    assert opts.priors_in_prompt is True and opts.tile == 0  # the page's switch; automatic tiles of a self-tiler
    priors = st["output"]["priors"]
    assert priors["prompt"] == "a cat"
    assert st["output"]["options"]["steps"] == 3 and "reference" not in st["output"]["options"]
    assert _req(server + priors["map"]["image"].lstrip("/"))[0] == 200
    assert opts.save_extra is True
    status, body, _ = _req(server + priors["extra"]["image"].lstrip("/"))
    assert status == 200 and Image.open(io.BytesIO(body)).size == (4, 4)


def test_priors_job_suggests_prompts(server):
    _, img = _upload(server, _png())
    _, job = _json(server + "api/jobs", {"kind": "priors", "image": img["id"], "method": "test-ui-gated"})
    st = _wait(server, job["id"])
    assert st["output"]["priors"] == {"prompt": "a suggested prompt", "tags": ["a", "b"]}
    _, job = _json(server + "api/jobs", {"kind": "priors", "image": img["id"], "method": "bicubic"})
    assert _wait(server, job["id"])["output"]["priors"] == {}


def test_port_in_use_is_a_one_line_error():
    import subprocess
    import sys

    with serve() as (url, _):
        port = url.rsplit(":", 1)[1].strip("/")
        proc = subprocess.run(
            [sys.executable, "-m", "semsr", "serve", "--port", port], capture_output=True, text=True, timeout=120
        )
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"semsr: error: cannot listen on 127.0.0.1:{port}: Address already in use"


@pytest.mark.slow
def test_diffusion_method_with_tiny_models(tiny_models):
    """sd-controlnet through the server: availability with paths, prompts/steps forwarded, step progress."""
    srv = make_server(
        "127.0.0.1", 0, paths={"base": str(tiny_models / "sd"), "controlnet": str(tiny_models / "controlnet")}
    )
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = srv.url
        by = {m["name"]: m for m in _json(url + "api/methods")[1]}
        assert by["sd-controlnet"]["available"] and by["sd-controlnet"]["diffusion"]
        assert by["sd-controlnet"]["missing_paths"] == []
        assert by["coser"]["available"] and by["coser"]["missing_paths"] == ["checkpoint", "clip"]
        _, img = _upload(url, _png(16, 16))
        body = {
            "image": img["id"],
            "method": "sd-controlnet",
            "prompt": "a cat",
            "negative_prompt": "blur",
            "steps": 2,
            "seed": 3,
            "colour_fix": "wavelet",
            "options": {"scheduler": "ddim"},
        }
        _, job = _json(url + "api/jobs", body)
        st = _wait(url, job["id"], timeout=300)
        assert st["state"] == "done", st
        assert (st["stage"], st["done"], st["total"]) == ("denoise", 2, 2)
        assert (st["output"]["width"], st["output"]["height"]) == (64, 64)
        assert st["output"]["options"]["scheduler"] == "ddim"
        _, job = _json(url + "api/jobs", {"image": img["id"], "method": "coser"})
        st = _wait(url, job["id"], timeout=120)
        assert st["state"] == "error" and "--checkpoint" in st["message"], st
    finally:
        srv.shutdown()
        srv.server_close()


def test_server_paths_never_replace_packaged_weights(tmp_path):
    """A --checkpoint for the recipes (here: a folder that is no default-diffusion checkpoint)
    leaves the shipped default model alone; METHOD=PATH scopes a path to one method."""
    from semsr.commands.serve import scoped_paths
    from semsr.core.errors import SemsrError
    from semsr.ui.catalog import paths_for

    other = tmp_path / "mmsr-run"
    other.mkdir()
    default, pth = resolve("default-diffusion"), resolve("realesrgan-pth")
    assert paths_for(default, {"checkpoint": str(other)}) == {}
    assert paths_for(pth, {"checkpoint": str(other)}) == {"checkpoint": str(other)}
    scoped = scoped_paths("checkpoint", [str(other), "default=/runs/mine"])
    assert scoped == {"": str(other), "default-diffusion": "/runs/mine"}
    assert paths_for(default, {"checkpoint": scoped}) == {"checkpoint": "/runs/mine"}
    assert paths_for(pth, {"checkpoint": scoped}) == {"checkpoint": str(other)}
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert scoped_paths("base", [str(odd)]) == {"": str(odd)}
    with pytest.raises(SemsrError, match="unknown method 'nope'"):
        scoped_paths("checkpoint", ["nope=/x"])
    with pytest.raises(SemsrError, match="given twice for mmsr"):
        scoped_paths("checkpoint", ["mmsr=/a", "mmsr=/b"])

    srv = make_server("127.0.0.1", 0, paths={"checkpoint": str(other)})
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = srv.url
        by = {m["name"]: m for m in _json(url + "api/methods")[1]}
        assert by["default"]["available"] and by["realesrgan-pth"]["missing_paths"] == []
        _, img = _upload(url, _png(16, 16))
        _, job = _json(url + "api/jobs", {"image": img["id"], "method": "default", "steps": 1})
        st = _wait(url, job["id"], timeout=120)
        assert st["state"] == "done", st
        assert (st["output"]["width"], st["output"]["height"]) == (64, 64)
    finally:
        srv.shutdown()
        srv.server_close()


def test_scoped_path_reaches_the_default_alias():
    from semsr.commands.serve import scoped_paths
    from semsr.ui.catalog import paths_for

    scoped = scoped_paths("checkpoint", ["default-diffusion=/runs/mine"])
    assert paths_for(resolve("default"), {"checkpoint": scoped}) == {"checkpoint": "/runs/mine"}


def test_job_options_read_json_as_the_parser_does():
    """Numbers, text and booleans from JSON are read as the options parser reads them."""
    app = DemoApp()
    try:
        entry = next(e for e in app.methods() if e["name"] == "test-ui-gated")
        as_text = app.options(
            entry, {"steps": "3", "guidance_scale": "1.5", "options": {"flag": "true", "temp_depth": "2"}}
        )
        as_json = app.options(entry, {"steps": 3, "guidance_scale": 1.5, "options": {"flag": True, "temp_depth": 2}})
        assert (
            as_text
            == as_json
            == resolve("test-ui-gated").parse(
                {"steps": 3, "guidance_scale": 1.5, "flag": True, "temp_depth": 2.0, "save_extra": True}
            )
        )
        assert app.options(entry, {"steps": None, "prompt": ""}) == GatedOptions(save_extra=True)  # null, "": default
    finally:
        app.close()


# ---------------------------------------------------------------- hardening (issue 23: what the server refuses)


@dataclass(kw_only=True, frozen=True)
class StepsOptions(MethodOptions):
    """Options of ``test-ui-steps``: a step count and a per-step delay."""

    steps: int = option(20, min=1, max=1000, help="steps")
    reference_steps: int = option(1, min=1, max=1000, help="a second step count")
    delay: float = option(0.02, min=0, max=1, help="seconds per step")


class _Steps:
    """2x nearest method that reports ``progress(done, total)`` after each of its ``steps`` (like the sampler)."""

    name, scale, tiles_itself = "test-ui-steps", 2, True

    def __call__(self, x: torch.Tensor, options: StepsOptions | None = None, *, progress: Any = False) -> SROutput:
        for i in range(options.steps):
            time.sleep(options.delay)
            if callable(progress):
                progress(i + 1, options.steps)
        return SROutput(x.repeat_interleave(2, 2).repeat_interleave(2, 3))


register(MethodSpec("test-ui-steps", lambda _options: _Steps(), StepsOptions, 2, "test method with steps"))


def _raw(url: str, request: bytes, read_for: float = 5.0) -> bytes:
    """Send raw bytes to the server of ``url``; what comes back until it closes or ``read_for`` seconds pass."""
    host, port = urllib.parse.urlparse(url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=read_for) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + read_for
        try:
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
        return data


def _statuses(reply: bytes) -> list[int]:
    """The status codes of every HTTP response in ``reply``."""
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", reply)]


def test_download_name_outside_latin1(server):
    """RFC 6266/5987: the page's download link works for any upload name (an ASCII fallback + filename*)."""
    name = "фото 照片 café.png"
    status, img = _upload(server, _png(), urllib.parse.quote(name))
    assert status == 201 and img["name"] == name
    _, job = _json(server + "api/jobs", {"image": img["id"], "method": "bicubic"})
    assert _wait(server, job["id"])["output"]["filename"] == "фото 照片 café_bicubic_x4.png"
    status, body, headers = _req(f"{server}api/jobs/{job['id']}/result?download=1")
    assert status == 200 and Image.open(io.BytesIO(body)).size == (24, 20)
    value = headers["Content-Disposition"]
    assert value == (
        "attachment; filename=\"____ __ cafe_bicubic_x4.png\"; filename*=UTF-8''"
        + urllib.parse.quote("фото 照片 café_bicubic_x4.png", safe="")
    )
    assert value.isascii()
    encoded = value.split("filename*=UTF-8''")[1]
    assert urllib.parse.unquote(encoded) == "фото 照片 café_bicubic_x4.png"


def test_malformed_job_requests_answer_400(server):
    """Odd types, non-UTF-8 bodies, deep nesting, unknown request fields: a 400 with the reason, never a crash."""
    _, img = _upload(server, _png())
    base = {"image": img["id"], "method": "test-ui-gated"}
    cases = [
        (dict(base, options="mode=y"), "options must be a JSON object {name: value}, got 'mode=y'"),
        (dict(base, options=0), "options must be a JSON object {name: value}, got 0"),
        (dict(base, options=5), "options must be a JSON object {name: value}, got 5"),
        (dict(base, options=False), "options must be a JSON object {name: value}, got False"),
        (dict(base, options=["mode"]), "options must be a JSON object"),
        (dict(base, stepz=3), "method 'test-ui-gated' has no option stepz; did you mean steps?"),
        (dict(base, imagee="x"), "method 'test-ui-gated' has no option imagee; did you mean image?"),
        (dict(base, steps=3, options={"steps": 4}), "option steps is given twice"),
        (dict(base, image=["i1"]), "image must be the id of an upload, got ['i1']"),
        (dict(base, method={"name": "bicubic"}), "method must be a method name"),
        (dict(base, options={"reference": 5}), "option reference: expected the id of an upload, got 5"),
        (dict(base, prompt="x" * 10_000, steps="y" * 10_000), "option steps: expected an integer, got 'yyy"),
        (dict(base, options={"mode": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}}), "nests deeper than 8"),
    ]
    for body, expected in cases:
        status, err = _json(server + "api/jobs", body)
        assert status == 400 and expected in err["error"] and "\n" not in err["error"], (body, err)
        assert len(err["error"]) < 300, err  # client input is echoed shortened
    raw_cases = [
        (b'{"image": "\xff\xfe", "method": "bicubic"}', "the request is not UTF-8 (byte 11)"),
        (b"[" * 100_000 + b"]" * 100_000, "the request nests deeper than 8 levels"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "the request nests deeper than 8 levels"),
        (b'{"image": "x", "steps": NaN}', "the request is not JSON: NaN is not JSON"),
        (b"[1, 2]", "the request must be a JSON object, got list"),
        (b"{not json", "the request is not JSON"),
    ]
    for data, expected in raw_cases:
        status, body, _ = _req(server + "api/jobs", data, headers={"Content-Type": "application/json"})
        err = json.loads(body)["error"]
        assert status == 400 and err.startswith(expected), (data[:40], err)
    # the server still answers
    assert _json(server + "api/jobs", dict(base, steps=2))[0] == 202


def test_host_and_origin_allow_lists(server):
    """DNS rebinding (a foreign Host) and cross-site requests (a foreign Origin) are refused with 403."""
    assert _req(server + "api/config", headers={"Host": "evil.example:7860"})[0] == 403
    status, body, _ = _req(server + "api/config", headers={"Host": "evil.example"})
    assert status == 403 and "semsr serve --allow-host" in json.loads(body)["error"]
    assert _req(server + "api/config", headers={"Host": "localhost:1"})[0] == 200
    _, img = _upload(server, _png())
    job = {"image": img["id"], "method": "bicubic"}
    for origin in ("http://evil.example", "null", "http://localhost:1"):  # another port is another site
        status, body, _ = _req(server + "api/jobs", job, headers={"Origin": origin})
        assert status == 403 and "not accepted" in json.loads(body)["error"], origin
        assert _req(server + "api/images", _png(), headers={"Origin": origin})[0] == 403
    own = server.rstrip("/")
    assert _req(server + "api/jobs", job, headers={"Origin": own})[0] == 202


def test_only_known_files_are_served(server):
    """Static files by plain name, uploads and results by id: no path leads out of those folders."""
    for path in ("static/../server.py", "static/..%2fserver.py", "static/..", "api/images/..%2f..", "../etc/passwd"):
        reply = _raw(server, f"GET /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        assert _statuses(reply) == [404] and b"import" not in reply, path
    assert _req(server + "static/app.js")[0] == 200


def test_json_endpoints_need_a_json_content_type(server):
    """A text/plain cross-site POST (no CORS preflight) is not parsed as JSON; uploads refuse form types too."""
    _, img = _upload(server, _png())
    data = json.dumps({"image": img["id"], "method": "bicubic"}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        status, body, _ = _req(server + "api/jobs", data, headers=headers)
        assert status == 415 and "application/json" in json.loads(body)["error"], ctype
    status, body, _ = _req(server + "api/images", _png(), headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/octet-stream" in json.loads(body)["error"]
    assert _req(server + "api/jobs", data, headers={"Content-Type": "application/json; charset=utf-8"})[0] == 202


def _own_server(**opts: Any):
    srv = make_server("127.0.0.1", 0, **opts)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


def test_stalled_connections_time_out_and_are_capped():
    """A silent connection is closed after the request timeout (408 for a stalled body); connections
    beyond the cap are answered 503 at once instead of holding a thread each. The timeout leaves the idle
    connections room to stay open on a loaded machine (at 1 s one could time out first and free a slot)."""
    srv = _own_server(request_timeout=2.5, max_connections=3)
    try:
        url = srv.url
        t0 = time.monotonic()
        reply = _raw(url, b"POST /api/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\nabc")
        assert _statuses(reply) == [408] and b"stalled" in reply and time.monotonic() - t0 < 6
        host, port = srv.server_address[:2]
        idle = [socket.create_connection((host, port), timeout=5) for _ in range(3)]
        try:
            time.sleep(0.3)
            reply = _raw(url, b"GET /api/config HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", read_for=2)
            assert _statuses(reply) == [503] and b"busy" in reply
            for sock in idle:  # the server closes the silent ones
                assert sock.recv(100) == b""
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.3)
        assert _req(url + "api/config")[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_cancel_running_job_time_limit_and_step_cap():
    """DELETE stops a running job at its next step; a job stops after the time limit; steps are capped."""
    srv = _own_server(job_timeout=1.0, max_steps=300)
    try:
        url = srv.url
        _, img = _upload(url, _png())
        body = {"image": img["id"], "method": "test-ui-steps", "steps": 300, "options": {"delay": 0.05}}
        _, job = _json(url + "api/jobs", body)
        t0 = time.monotonic()
        while _json(f"{url}api/jobs/{job['id']}")[1]["done"] < 2:
            time.sleep(0.02)
        status, reply = _json(f"{url}api/jobs/{job['id']}", method="DELETE")
        assert status == 202 and reply == {"id": job["id"], "state": "running", "cancelling": True}
        st = _wait(url, job["id"], ("cancelled", "done", "error"), timeout=10)
        assert st["state"] == "cancelled" and st["message"] == "cancelled while running", st
        assert st["done"] < 10 and time.monotonic() - t0 < 5
        assert _json(f"{url}api/jobs/{job['id']}", method="DELETE")[0] == 409
        assert _json(f"{url}api/jobs/j999-00000", method="DELETE")[0] == 404

        _, job = _json(url + "api/jobs", body)  # 300 x 0.05 s > the 1 s limit
        st = _wait(url, job["id"], ("cancelled", "done", "error"), timeout=15)
        assert st["state"] == "error" and "time limit" in st["message"] and "--job-timeout" in st["message"], st
        assert st["done"] < 100 and st["elapsed"] < 3

        for key in ("steps", "reference_steps"):
            status, err = _json(url + "api/jobs", {**body, key: 301})
            assert status == 400, err
            assert err["error"] == f"option {key}: at most 300 on this server (semsr serve --max-steps), got 301"
        methods = {m["name"]: m for m in _json(url + "api/methods")[1]}
        assert _json(url + "api/config")[1]["max_steps"] == 300
        assert methods["sd-controlnet"]["common"]["steps"]["max"] == 300
        assert {o["dest"]: o["max"] for o in methods["test-ui-steps"]["options"]}["reference_steps"] == 300
    finally:
        srv.shutdown()
        srv.server_close()


def test_chunked_upload_gets_one_answer(server):
    """A chunked upload is read as such: one 201, no second spurious 400 from the chunks."""
    png = _png()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(png[i : i + 40]), png[i : i + 40]) for i in range(0, len(png), 40))
    request = (
        b"POST /api/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
        b"X-Filename: c.png\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    )
    reply = _raw(server, request, read_for=1.5)
    assert _statuses(reply) == [201], reply
    assert b'"width": 6' in reply
    too_big = b"POST /api/images HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    too_big += b"10000\r\n" + b"\0" * 0x10000 + b"\r\n0\r\n\r\n"
    reply = _raw(server, too_big, read_for=1.5)
    assert _statuses(reply) == [413] and b"above the upload limit of 49 KB" in reply


def test_serve_command_options_and_quiet_disconnects(tmp_path):
    """`semsr serve --allow-host/--allow-origin/--max-steps/--job-timeout` reach the server, and clients
    that vanish mid-upload or before reading the reply leave no traceback on its stderr."""
    log_file = tmp_path / "stderr.txt"
    flags = ("--allow-host", "demo.lan", "--allow-origin", "http://tool.lan:3000", "--max-steps", "40")
    with serve(*flags, "--job-timeout", "60", stderr=log_file) as (url, _):
        status, config, _ = _req(url + "api/config", headers={"Host": "demo.lan:7860"})
        assert status == 200 and json.loads(config)["max_steps"] == 40 and json.loads(config)["job_timeout"] == 60
        assert _req(url + "api/config", headers={"Host": "other.lan"})[0] == 403
        assert _req(url + "api/config", headers={"Origin": "http://tool.lan:3000"})[0] == 200
        assert _req(url + "api/config", headers={"Origin": "http://tool.lan:3001"})[0] == 403

        host, port = urllib.parse.urlparse(url).netloc.split(":")
        requests = [
            b"POST /api/images HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n" + b"\0" * 1000,
            b"GET /static/app.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        ]
        for request in requests * 3:
            sock = socket.create_connection((host, int(port)))
            sock.sendall(request)
            time.sleep(0.2)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
            sock.close()
        time.sleep(0.5)
        assert _req(url + "api/config")[0] == 200
    text = log_file.read_text()
    assert "Traceback" not in text and "Error" not in text, text


def test_outscale_is_a_validated_job_field_the_result_honours(server):
    """``outscale`` resizes the result to ``round(outscale * size)`` (not ignored); bad factors are a 400."""
    _, img = _upload(server, _png(), "o.png")
    for factor, size, name in (
        (2, (12, 10), "o_bicubic_x2.png"),
        ("1.5", (9, 8), "o_bicubic_x1.5.png"),
        (4, (24, 20), None),
    ):
        status, job = _json(server + "api/jobs", {"image": img["id"], "method": "bicubic", "outscale": factor})
        assert status == 202, job
        st = _wait(server, job["id"])
        assert st["state"] == "done", st
        assert (st["output"]["width"], st["output"]["height"]) == size and st["output"]["outscale"] == float(factor)
        status, body, headers = _req(f"{server}api/jobs/{job['id']}/result?download=1")
        assert Image.open(io.BytesIO(body)).size == size
        assert f'filename="{name or "o_bicubic_x4.png"}"' in headers["Content-Disposition"]
    for bad in (0, -1, 4.5, "two", True, [2], {"x": 1}):
        status, body = _json(server + "api/jobs", {"image": img["id"], "method": "bicubic", "outscale": bad})
        assert status == 400 and body["error"].startswith("outscale: expected a factor above 0"), (bad, body)
        assert "at most the method's scale 4" in body["error"]
    status, body = _json(server + "api/jobs", {"image": img["id"], "method": "bicubic", "outscale": "nan"})
    assert status == 400


def test_real_defaults_presets_and_advanced_options_in_the_catalogue():
    """Defaults a checkpoint decides are shown as values (the default model: 1 step), presets are concrete
    values of the method's options within the server's step cap, ablations are marked advanced."""
    srv = _own_server(max_steps=30)
    try:
        _, methods = _json(srv.url + "api/methods")
    finally:
        srv.shutdown()
        srv.server_close()
    by = {m["name"]: m for m in methods}
    default = by["default"]
    assert default["common"]["steps"]["default"] == 1  # the packaged checkpoint's default_steps, not None
    assert default["presets"] == {
        "fidelity": {"steps": 0, "guidance_scale": 1.0},
        "balanced": {"steps": 1, "guidance_scale": 1.0},
        "detail": {"steps": 4, "guidance_scale": 1.0},
    }
    advanced = {o["dest"] for o in default["options"] if o["advanced"]}
    assert {"no_text_prior", "no_edge_prior"} <= advanced
    assert {o["dest"] for o in default["options"]} - advanced == {"scheduler", "detail"}
    detail = next(o for o in default["options"] if o["dest"] == "detail")
    assert (detail["default"], detail["min"], detail["max"]) == (1.0, 0.0, 1.0)
    gated = by["test-ui-gated"]
    assert not any(o["advanced"] for o in gated["options"])
    assert gated["presets"] == {
        "fidelity": {"steps": 10, "guidance_scale": 1.0},
        "balanced": {"steps": 20, "guidance_scale": 1.0},
        "detail": {"steps": 30, "guidance_scale": 1.0},  # 40, capped by --max-steps 30
    }
    assert by["bicubic"]["presets"] == {}  # nothing to trade in a single-pass method


def test_example_image_is_offered_and_used_with_one_request():
    """The bundled sample is listed in /api/config, served, and becomes an upload with one JSON POST."""
    srv = _own_server()
    url = srv.url
    try:
        _, config = _json(url + "api/config")
        assert config["examples"] == [{"name": "sample", "width": 192, "height": 192}]
        status, body, headers = _req(url + "api/examples/sample")
        assert (
            status == 200 and headers["Content-Type"] == "image/png" and Image.open(io.BytesIO(body)).size == (192, 192)
        )
        status, body, _ = _req(url + "api/examples/sample", b"{}", headers={"Content-Type": "text/plain"})
        assert status == 415  # a cross-site form cannot create uploads
        assert _json(url + "api/examples/nope", {})[0] == 400
        status, img = _json(url + "api/examples/sample", {})
        assert status == 201 and (img["width"], img["height"], img["name"]) == (192, 192, "sample.png")
        status, job = _json(url + "api/jobs", {"image": img["id"], "method": "bicubic", "outscale": 2})
        st = _wait(url, job["id"])
        assert st["state"] == "done" and (st["output"]["width"], st["output"]["height"]) == (384, 384)
        assert st["output"]["filename"] == "sample_bicubic_x2.png"
    finally:
        srv.shutdown()
        srv.server_close()


def test_shown_steps_default_follows_the_served_checkpoint(tmp_path):
    """The default model's shown steps default is its checkpoint's default_steps: the packaged one (1), or a
    retrained one given to ``semsr serve`` (read from its model_index.json)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    index = json.loads(_packaged_index().read_text())
    index["meta"]["default_steps"] = 3
    (mine / "model_index.json").write_text(json.dumps(index))
    entries = catalogue({"checkpoint": {"default-diffusion": str(mine)}})
    for name in ("default", "default-diffusion"):
        assert find(entries, name)["common"]["steps"]["default"] == 3
        assert find(entries, name)["presets"]["detail"]["steps"] == 6
    assert find(catalogue(), "default")["common"]["steps"]["default"] == 1
    empty = tmp_path / "empty"
    empty.mkdir()  # no checkpoint there: no value to show (the field says auto), no presets to derive
    assert find(catalogue({"checkpoint": {"default": str(empty)}}), "default")["common"]["steps"]["default"] is None


def _packaged_index() -> Path:
    return packaged_weights() / "model_index.json"


def test_serve_takes_every_weight_path_the_recipes_need() -> None:
    """rfa (database, aligner, text decoder), mmsr (depth/seg models), dalpsr (tagger) can be served."""
    assert {"db", "aligner", "text_decoder"} <= set(path_options(resolve("rfa")))
    assert {"depth_model", "seg_model"} <= set(path_options(resolve("mmsr")))
    assert "tagger" in path_options(resolve("dalpsr"))
    out = subprocess.run(
        [sys.executable, "-m", "semsr", "serve", "-h"], capture_output=True, text=True, timeout=120
    ).stdout
    assert "--text-decoder" in out and "--depth-model" in out and "--db" in out
