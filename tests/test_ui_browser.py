"""The web demo in a real headless Chromium (Debian package) driven by Playwright.

Run with ``.ci/browser`` (installs chromium + playwright, then ``pytest -m browser``).
Skips when /usr/bin/chromium or the playwright package is missing. Saves
screenshots of the demo to ``$SEMSR_DEMO_SCREENSHOT`` and beside it
(``demo-options.png``, ``demo-batch.png``; default: the temp folder;
``SEMSR_DEMO_SCREENSHOT=docs/img/demo.png`` refreshes the ones docs/webdemo.md
shows — tests never touch tracked files on their own). The server gets the tiny
random models (SD, MMSR checkpoint, VLM) so a prompt-driven method can pre-fill
its prompt from the image's priors.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _ui_helpers import serve

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # 35-60 s on 2 busy cores

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = Path(os.environ.get("SEMSR_DEMO_SCREENSHOT") or Path(tempfile.gettempdir()) / "semsr-demo.png")
MAX_SCREENSHOT = 300_000


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory, tiny_models):
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    paths = [
        "--base",
        str(tiny_models / "sd"),
        "--checkpoint",
        str(tiny_models / "mmsr"),
        "--vlm",
        str(tiny_models / "vlm"),
        "--threads",
        "1",
        "--max-jobs",
        "2",  # a batch of three is queued two at a time
    ]
    with serve(*paths) as (url, seconds), sync_api.sync_playwright() as pw:
        assert seconds < 60
        ctx = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            accept_downloads=True,
            viewport={"width": 1200, "height": 760},
        )
        requests: list[str] = []
        ctx.on("request", lambda r: requests.append(r.url))
        page = ctx.new_page()
        page.set_default_timeout(120_000)
        page.goto(url)
        page.wait_for_selector("#method option", state="attached")
        yield page, url, requests
        ctx.close()


def _photo(path: Path, size: int) -> Path:
    """A crop of the bundled sample photo, ``size`` x ``size``."""
    im = Image.open(REPO / "src" / "semsr" / "assets" / "sample.png").convert("RGB")
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im.crop((left, top, left + size, top + size)).save(path)
    return path


def _upload(page, path: Path) -> None:
    page.set_input_files("#file", str(path))


def _run(page, method: str, outscale: str = "") -> None:
    page.select_option("#method", method)
    page.select_option("#outscale", outscale)
    page.wait_for_function("!document.querySelector('#run').disabled")
    before = page.eval_on_selector("#after", "e => e.src")
    page.click("#run")
    page.wait_for_function(
        "prev => { const a = document.querySelector('#after'); return a.src !== prev && a.complete && a.naturalWidth > 0; }",
        arg=before,
    )


def test_upload_run_download_and_errors(browser_page, tmp_path):
    page, url, requests = browser_page
    # Upload and run the fast method.
    _upload(page, _photo(tmp_path / "tiny.png", 24))
    page.wait_for_function("document.querySelector('#drop-text').textContent.includes('24×24')")
    assert page.is_hidden("#error")
    assert page.is_hidden("#compare") and page.is_hidden("#download")  # nothing to compare yet
    # ... but the upload is previewed at once
    assert page.is_visible("#preview-box") and page.is_hidden("#placeholder")
    page.wait_for_function("document.querySelector('#previews img').naturalWidth === 24")
    assert "tiny.png · 24×24" in page.inner_text("#previews")
    # the output scale: the method's own factor or a smaller one, and the result honours it
    page.select_option("#method", "bicubic")
    assert page.eval_on_selector_all("#outscale option", "os => os.map(o => o.value)") == ["", "1", "1.5", "2", "3"]
    _run(page, "bicubic", "2")
    assert page.eval_on_selector("#after", "e => [e.naturalWidth, e.naturalHeight]") == [48, 48]
    assert page.eval_on_selector("#download", "e => e.download") == "tiny_bicubic_x2.png"
    _run(page, "bicubic")
    assert page.eval_on_selector("#after", "e => [e.naturalWidth, e.naturalHeight]") == [96, 96]
    assert "bicubic" in page.inner_text("#result-info")
    with page.expect_download() as dl:
        page.click("#download")
    saved = tmp_path / "download.png"
    dl.value.save_as(saved)
    assert dl.value.suggested_filename == "tiny_bicubic_x4.png"
    assert Image.open(saved).size == (96, 96)

    # A non-image gives a clear message in the page.
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not an image")
    _upload(page, bad)
    page.wait_for_selector("#error:not([hidden])")
    assert "notes.txt: not a readable image" in page.inner_text("#error")
    assert page.is_disabled("#run")

    # The default method on a small photo; this run is the screenshot.
    _upload(page, _photo(tmp_path / "photo.png", 64))
    page.wait_for_function("document.querySelector('#drop-text').textContent.includes('64×64')")
    assert page.is_hidden("#error")
    page.select_option("#method", "default")
    page.wait_for_function("!document.querySelector('#run').disabled")  # the priors look-up has finished
    assert page.input_value("#prompt") == ""  # the shipped default suggests no prompt
    _run(page, "default")
    assert page.eval_on_selector("#after", "e => e.naturalWidth") == 256
    out = np.asarray(Image.open(io.BytesIO(page.request.get(page.eval_on_selector("#download", "e => e.href")).body())))
    assert out.shape == (256, 256, 3) and out.std() > 5  # a real picture, not a blank
    page.mouse.click(*_centre(page, "#compare", 0.6, 0.4))  # move the zoomed crops
    page.eval_on_selector("#slider", "e => { e.value = 45; e.dispatchEvent(new Event('input')); }")
    _save_screenshot(page.screenshot(full_page=True))

    # Everything the page fetched came from our server (offline: no CDN, fonts, analytics).
    assert requests and all(r.startswith(url) or r.startswith("blob:") or r.startswith("data:") for r in requests), (
        requests
    )


def _server_priors(url: str, image_id: str, method: str) -> dict:
    """What the server's priors job (the page's pre-fill source) returns, fetched over HTTP."""
    req = urllib.request.Request(
        url + "api/jobs",
        json.dumps({"kind": "priors", "image": image_id, "method": method}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        job = json.load(r)["id"]
    for _ in range(600):
        with urllib.request.urlopen(f"{url}api/jobs/{job}", timeout=30) as r:
            st = json.load(r)
        if st["state"] in ("done", "error"):
            assert st["state"] == "done", st
            return st["output"]["priors"]
        time.sleep(0.2)
    raise AssertionError(f"priors job {job} did not finish")


def test_prompt_prefilled_from_priors_and_temperature_sliders(browser_page, tmp_path):
    """MMSR (tiny models + tiny VLM): the upload's caption pre-fills the prompt; the edited prompt and a moved
    temperature slider reach the method; the sliders are range inputs."""
    page, url, _ = browser_page
    page.select_option("#method", "bicubic")  # no extraction while uploading
    _upload(page, _photo(tmp_path / "small.png", 16))
    page.wait_for_function("document.querySelector('#drop-text').textContent.includes('16×16')")
    assert page.input_value("#prompt") == page.input_value("#negative_prompt") == ""
    page.select_option("#method", "mmsr")  # a method with priors: extraction starts at once
    page.wait_for_function("document.querySelector('#prompt').value !== ''")
    page.wait_for_function("!document.querySelector('#run').disabled")
    prompt = page.input_value("#prompt")
    suggested = _server_priors(url, page.evaluate("state.image.id"), "mmsr")
    assert prompt == suggested["prompt"] == suggested["caption"]  # the tiny VLM's caption of this image
    assert page.input_value("#negative_prompt") == suggested["negative_prompt"]
    assert "priors extracted" in page.inner_text("#note")

    sliders = page.eval_on_selector_all(
        "#mo-fields input[type=range]", "els => els.map(e => [e.dataset.dest, e.min, e.max, e.value])"
    )
    assert sliders == [[f"{m}_temperature", "0.4", "10", "1"] for m in ("caption", "edge", "depth", "seg")]
    assert page.locator("#mo-fields [data-dest=modality_temperature]").count() == 0

    page.fill("#prompt", "a cat, " + prompt)  # edit the pre-filled prompt
    page.fill("#steps", "1")
    page.eval_on_selector("[data-dest=edge_temperature]", "e => { e.value = 2; e.dispatchEvent(new Event('input')); }")
    assert "2" in page.inner_text("#mo-fields")  # the slider shows its value
    before = page.eval_on_selector("#after", "e => e.src")
    page.click("#run")
    page.wait_for_function(
        "prev => { const a = document.querySelector('#after'); return a.src !== prev && a.complete && a.naturalWidth > 0; }",
        arg=before,
    )
    assert page.eval_on_selector("#after", "e => e.naturalWidth") == 64
    out = page.evaluate("state.result")
    assert out["options"]["edge_temperature"] == 2.0 and out["options"]["steps"] == 1
    assert "priors_in_prompt" not in out["options"]  # sent only to methods that have the option (mmsr has not)
    assert "caption_temperature" not in out["options"]  # sliders left at their default are not sent
    assert out["priors"]["prompt"] == "a cat, " + prompt and out["priors"]["caption_source"] == "user"
    assert out["priors"]["modality_temperature"] == {"edge": 2.0}
    assert sorted(page.eval_on_selector_all("#priors-list img", "els => els.map(e => e.alt)")) == [
        "depth",
        "edge",
        "seg",
    ]
    assert "a cat, " in page.inner_text("#priors-list")


def _centre(page, selector: str, fx: float, fy: float) -> tuple[float, float]:
    box = page.locator(selector).bounding_box()
    return box["x"] + fx * box["width"], box["y"] + fy * box["height"]


def _save_screenshot(png: bytes, name: str | None = None) -> None:
    """Write the screenshot (``SCREENSHOT``, or ``name`` in its folder), reduced to a palette image if needed to stay < 300 KB."""
    im = Image.open(io.BytesIO(png)).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    colours = 256
    while buf.tell() >= MAX_SCREENSHOT and colours >= 32:
        buf = io.BytesIO()
        im.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, "PNG", optimize=True)
        colours //= 2
    assert buf.tell() < MAX_SCREENSHOT
    path = SCREENSHOT if name is None else SCREENSHOT.with_name(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def test_real_defaults_presets_advanced_options_and_prompt(browser_page, tmp_path):
    """The default model's fields hold its real defaults (1 step), the presets write concrete values and say
    which, the research ablations sit behind the Advanced disclosure, and the prompt is empty with a
    placeholder saying what it does."""
    page, _, _ = browser_page
    page.select_option("#method", "mmsr")
    page.fill("#prompt", "")  # the previous test's prompts (kept across method changes, as typed text is)
    page.fill("#negative_prompt", "")
    page.select_option("#method", "default")
    assert page.input_value("#steps") == "1" and page.input_value("#guidance_scale") == "1"
    assert page.input_value("#seed") == "0" and page.input_value("[data-dest=scheduler]") == "ddim"
    assert page.input_value("#prompt") == ""
    assert page.get_attribute("#prompt", "placeholder").startswith("optional: positive prompt")
    # balanced = the defaults; fidelity and detail write their values and show them
    assert "balanced: steps 1 · guidance 1" in page.inner_text("#preset-values")
    page.click(".preset[data-preset=fidelity]")
    assert page.input_value("#steps") == "0" and "fidelity: steps 0" in page.inner_text("#preset-values")
    page.click(".preset[data-preset=detail]")
    assert page.input_value("#steps") == "4" and page.get_attribute(".preset[data-preset=detail]", "class").endswith(
        "active"
    )
    page.fill("#steps", "3")
    assert page.inner_text("#preset-values") == "custom settings"
    # research switches and tiling internals only behind the disclosure
    assert page.locator("#mo-fields [data-dest=no_text_prior]").count() == 0
    assert page.is_hidden("[data-dest=no_text_prior]") and page.is_hidden("[data-dest=no_edge_prior]")
    assert page.is_hidden("#seed") and page.is_hidden("#tile")
    assert page.is_visible("[data-dest=scheduler]")
    page.click("#advanced summary")
    assert page.is_visible("[data-dest=no_text_prior]") and page.is_visible("#seed")
    assert page.get_attribute("[data-dest=latent_tile]", "placeholder") == "auto"
    page.click(".preset[data-preset=balanced]")
    page.wait_for_function("!document.querySelector('#run').disabled")  # the priors look-up has finished
    _save_screenshot(page.screenshot(full_page=True), "demo-options.png")
    page.click("#advanced summary")
    assert page.is_hidden("[data-dest=no_text_prior]")
    # the shipped default was trained without the text prior: an upload suggests nothing, the prompt stays empty
    _upload(page, _photo(tmp_path / "face.png", 32))
    page.wait_for_function("document.querySelector('#drop-text').textContent.includes('face.png · 32×32')")
    page.wait_for_function("!document.querySelector('#run').disabled")  # its priors look-up has finished
    assert page.input_value("#prompt") == "" and "suggests no priors" in page.inner_text("#note")
    page.click("#extract")
    page.wait_for_function("document.querySelector('#note').textContent.includes('suggests no priors')")
    assert page.input_value("#prompt") == "" and page.is_hidden("#priors")


def test_example_batch_history_and_cancel(browser_page, tmp_path):
    """One click uses the bundled sample; several files make a batch queued as jobs whose results are listed
    with download links; Cancel stops a running job."""
    page, url, _ = browser_page
    page.select_option("#method", "bicubic")
    page.click("#examples button[data-example=sample]")
    page.wait_for_function("document.querySelector('#drop-text').textContent.includes('sample.png · 192×192')")
    page.wait_for_function("document.querySelector('#previews img').naturalWidth === 192")

    files = [_photo(tmp_path / f"b{i}.png", size) for i, size in enumerate((16, 20, 24))]
    page.set_input_files("#file", [str(f) for f in files])
    page.wait_for_function("document.querySelector('#run').textContent === 'Upscale 3 images'")
    assert page.locator("#previews img").count() == 3
    before = page.locator("#history-list li").count()
    page.click("#run")
    page.wait_for_function(f"document.querySelectorAll('#history-list li').length === {before + 3}")
    page.wait_for_function("!document.querySelector('#run').disabled")
    links = page.eval_on_selector_all("#history-list li a", "els => els.map(a => [a.download, a.href])")[:3]
    assert [name for name, _ in links] == ["b2_bicubic_x4.png", "b1_bicubic_x4.png", "b0_bicubic_x4.png"]
    for (name, href), size in zip(links, (24, 20, 16), strict=True):
        assert Image.open(io.BytesIO(page.request.get(href).body())).size == (4 * size, 4 * size), name
    _save_screenshot(page.screenshot(full_page=True), "demo-batch.png")

    # Cancel a running job: the default model with many steps stops after its current step.
    _upload(page, _photo(tmp_path / "slow.png", 32))
    page.select_option("#method", "default")
    page.wait_for_function("!document.querySelector('#run').disabled")
    page.fill("#steps", "200")
    count = page.locator("#history-list li").count()
    page.click("#run")
    page.wait_for_function("document.querySelector('#progress-text').textContent.includes('/200')")
    page.click("#cancel")
    page.wait_for_selector("#note:not([hidden])")
    assert "cancelled" in page.inner_text("#note") and page.is_hidden("#error")
    assert page.locator("#history-list li").count() == count and page.is_hidden("#cancel")
    page.wait_for_function("!document.querySelector('#run').disabled")
