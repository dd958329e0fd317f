"""The page of `edge serve` in a real headless Chromium (Debian's `chromium`, driven by Playwright), against a
real server process on a loopback port serving the default model: generate and watch it form, find the image
in the gallery and reuse its settings, the queue and cancel, the bundle chooser, img2img with a painted mask,
a phone-sized screen. The server requires a token (as on a network bind), so every test also checks that the
page carries it on every request it makes.

No browser is downloaded: Playwright drives /usr/bin/chromium (`make browser` installs it on Debian)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_edge
from servers import start, stop

CHROMIUM = Path(os.environ.get("EDGE_CHROMIUM", "/usr/bin/chromium"))
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(),
                                reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or `make browser`)")
sync_playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").sync_playwright

TOKEN = "page-test-token"  # the page's token path, even on loopback: opened as /?token=T, as the server prints it
PROMPT = "a red circle on a blue background"
STEPS = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`edge serve` of the default bundle and a copy of it, on a free loopback port; its URL and outputs folder."""
    root = tmp_path_factory.mktemp("serve-page")
    run_edge("convert", "default", "-o", root / "default")
    shutil.copytree(root / "default", root / "second")  # two bundles: the page offers a chooser
    outputs, log = root / "outputs", root / "server.log"
    proc, url = start([root / "default", root / "second"], outputs, log, "--token", TOKEN)
    yield {"url": url, "outputs": outputs}
    text = stop(proc, log)
    assert "Traceback" not in text, f"the server logged an error:\n{text}"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


def open_page(browser, server, **context):
    """The page opened as the server prints it (/?token=T), loaded (schedulers and sizes filled from /api/info).
    Collected in page.errors: what it logs as errors, and any API request of its own without the token (the
    server's cookie would let one through; a client on another origin has no cookie)."""
    page = browser.new_context(**context).new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)

    def check_token(request) -> None:
        if "/api/" in request.url and f"token={TOKEN}" not in request.url \
                and request.headers.get("authorization") != f"Bearer {TOKEN}":
            page.errors.append(f"no token on {request.method} {request.url}")

    page.on("request", check_token)
    page.goto(f"{server['url']}/?token={TOKEN}")
    page.wait_for_function("document.getElementById('scheduler').options.length > 0 && "
                           "document.getElementById('size').options.length > 0")
    assert "token" not in page.url, "the token stayed in the address bar"
    return page


# Records the values the progress bar shows (each change an observer callback sees) and every picture shown.
WATCH = """() => {
  window.seen = {progress: [], images: []};
  const bar = document.getElementById('progress'), img = document.getElementById('output');
  new MutationObserver((records) => {
    for (const r of records) {
      const value = Number(bar.getAttribute('value'));
      if (r.target === bar && value !== window.seen.progress.at(-1)) window.seen.progress.push(value);
      if (r.target === img && r.attributeName === 'src') window.seen.images.push(img.getAttribute('src'));
    }
  }).observe(document.body, {attributes: true, subtree: true, attributeFilter: ['value', 'src']});
}"""


def generate(page, count_before: int) -> None:
    """Click Generate and wait until the new image is in the gallery."""
    page.evaluate(WATCH)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(f"document.querySelectorAll('#gallery li').length > {count_before}", timeout=60_000)
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()


def test_generate_watch_the_gallery_and_reuse_the_settings(server, browser):
    page = open_page(browser, server, viewport={"width": 1280, "height": 800})
    for field in ("backend", "threads", "budget", "peak", "bundle", "precision", "cpu"):
        assert page.locator(f"#device-{field}").text_content() not in ("", "…"), field
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_label("Negative prompt").fill("green")
    page.get_by_label("Steps").fill(str(STEPS))
    page.get_by_label("Scheduler").select_option("dpmpp_2m")
    page.get_by_label("Guidance").fill("6")
    page.get_by_label("Seed").fill("1234")
    generate(page, 0)

    seen = page.evaluate("window.seen")
    progress = [v for v in seen["progress"] if v > 0]
    assert progress == sorted(progress) and any(v < STEPS for v in progress), f"the bar never moved: {seen['progress']}"
    assert page.locator("#progress").evaluate("b => b.value === b.max")
    previews = [s for s in seen["images"] if s.startswith("data:image/png;base64,")]
    assert previews, f"no preview shown while the image formed: {seen['images']}"
    final = page.locator("#output")
    assert "/api/gallery/" in final.get_attribute("src") and final.evaluate("i => i.complete && i.naturalWidth") == 64

    card = page.locator("#gallery li").first
    assert PROMPT in card.text_content() and "seed 1234" in card.text_content()
    assert card.locator("img").evaluate("i => i.complete && i.naturalWidth") == 64
    download = page.request.get(server["url"] + card.get_by_role("link", name="Download").get_attribute("href"))
    assert download.ok and "attachment" in download.headers.get("content-disposition", "")
    assert Image.open(io.BytesIO(download.body())).size == (64, 64)

    page.get_by_role("button", name="Random").click()
    assert page.get_by_label("Seed").input_value() == "-1"
    page.get_by_role("button", name="Reuse last").click()
    assert page.get_by_label("Seed").input_value() == "1234"

    for label, value in (("Prompt", ""), ("Negative prompt", ""), ("Steps", "20"), ("Guidance", "7.5"), ("Seed", "-1")):
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_label("Scheduler").select_option("euler")
    card.get_by_role("button", name="Use these settings again").click()
    filled = {label: page.get_by_label(label, exact=True).input_value()
              for label in ("Prompt", "Negative prompt", "Steps", "Scheduler", "Guidance", "Seed", "Size")}
    assert filled == {"Prompt": PROMPT, "Negative prompt": "green", "Steps": str(STEPS), "Scheduler": "dpmpp_2m",
                      "Guidance": "6", "Seed": "1234", "Size": "64x64"}
    assert not page.errors, page.errors


def test_queue_position_and_cancel(server, browser):
    """Behind another client's long job the page shows its place in the queue; Cancel takes it out."""
    page = open_page(browser, server, viewport={"width": 1280, "height": 800})
    before = page.locator("#gallery li").count()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    blocker = page.request.post(server["url"] + "/api/jobs", headers=auth,
                                data={"prompt": PROMPT, "steps": 150, "seed": 1}).json()
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_label("Steps").fill("4")
    page.get_by_role("button", name="Generate").click()
    status = page.get_by_role("status")
    status.filter(has_text="Queued: position 1").wait_for()
    page.get_by_role("button", name="Cancel").click()
    status.filter(has_text="Cancelled.").wait_for()
    assert page.get_by_role("button", name="Generate").is_enabled()
    cancelled = page.request.post(f"{server['url']}/api/jobs/{blocker['id']}/cancel", headers=auth).json()
    assert cancelled["state"] == "cancelled"
    page.get_by_role("button", name="Refresh").click()
    page.wait_for_timeout(300)
    assert page.locator("#gallery li").count() == before, "a cancelled job left an image"
    assert not page.errors, page.errors


def test_the_bundle_chooser_switches_bundles(server, browser):
    page = open_page(browser, server, viewport={"width": 1280, "height": 800})
    chooser = page.get_by_label("Model bundle")
    assert chooser.is_visible() and page.locator("#bundle option").count() == 2
    assert page.locator("#device-bundle").text_content() == "default"
    before = page.locator("#gallery li").count()
    chooser.select_option("second")
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_label("Steps").fill("4")
    generate(page, before)
    page.locator("#device-bundle").filter(has_text="second").wait_for()
    chooser.select_option("default")  # back, so the other tests run on the first bundle's sessions
    generate(page, before + 1)
    page.locator("#device-bundle").filter(has_text="default").wait_for()
    assert not page.errors, page.errors


def test_the_page_starts_from_the_bundles_recommended_settings(browser, tmp_path):
    """A few-step bundle (SD-Turbo's sampler: Euler, trailing timesteps) opens the page at its own 1 step without
    guidance, and Generate without touching them draws with those."""
    from test_few_step import _model

    from edge.png import read_params

    run_edge("convert", _model(tmp_path, "EulerDiscreteScheduler", timestep_spacing="trailing"), "-o",
             tmp_path / "turbo", "--no-memory-profile", "--no-tiled-vae")
    outputs, log = tmp_path / "outputs", tmp_path / "server.log"
    proc, url = start([tmp_path / "turbo"], outputs, log, "--token", TOKEN)
    try:
        page = open_page(browser, {"url": url})
        fields = [page.get_by_label(label, exact=True).input_value() for label in ("Steps", "Guidance", "Scheduler")]
        assert fields == ["1", "0", "euler"]
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        generate(page, 0)
        params = read_params(next(outputs.glob("*.png")))
        assert (params["steps"], params["guidance"], params["scheduler"]) == (1, 0.0, "euler")
        assert not page.errors, page.errors
    finally:
        assert "Traceback" not in stop(proc, log)


def test_img2img_with_a_painted_mask(server, browser, tmp_path):
    """Upload a picture, paint a stripe across it: the server repaints the stripe and keeps every other pixel."""
    start = np.zeros((64, 64, 3), np.uint8)
    start[:] = (20, 40, 200)
    start[16:48, 16:48] = (220, 30, 30)
    Image.fromarray(start).save(tmp_path / "start.png")

    page = open_page(browser, server, viewport={"width": 1280, "height": 800})
    before = page.locator("#gallery li").count()
    page.get_by_label("Prompt", exact=True).fill("a large yellow square on a black background")
    page.get_by_label("Steps").fill("8")
    page.get_by_label("Seed").fill("7")
    page.get_by_label("Image", exact=True).set_input_files(tmp_path / "start.png")
    mask = page.locator("#mask-canvas")
    mask.wait_for(state="visible")
    page.get_by_label("Strength").fill("0.6")
    box = mask.bounding_box()
    y = box["y"] + box["height"] / 2  # a horizontal stripe through the middle, brush 8 px of 64
    page.mouse.move(box["x"] + 2, y)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(box["x"] + 2 + k * (box["width"] - 4) / 10, y)
    page.mouse.up()
    generate(page, before)

    card = page.locator("#gallery li").first
    assert "strength 0.6" in card.text_content() and "inpainted" in card.text_content()
    name = card.get_attribute("data-name")
    out = np.asarray(Image.open(server["outputs"] / name).convert("RGB"))
    far = np.ones((64, 64), bool)
    far[32 - 10 : 32 + 10] = False  # the stripe and a margin for its anti-aliased edge
    assert (out[far] == start[far]).all(), "pixels outside the painted mask changed"
    assert (out[30:34] != start[30:34]).any(), "the painted stripe was not repainted"
    assert not page.errors, page.errors


def test_phone_layout_and_touch_painting(server, browser, tmp_path):
    page = open_page(browser, server, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                     device_scale_factor=3)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "the page scrolls sideways on a phone"
    form, output, gallery = (page.locator(s).bounding_box() for s in ("#gen-form", ".output", ".gallery-panel"))
    assert form["x"] == output["x"] == gallery["x"], "not one column"
    assert output["y"] >= form["y"] + form["height"] and gallery["y"] >= output["y"] + output["height"]
    assert form["width"] > 0.85 * 390
    for label in ("Prompt", "Steps", "Scheduler", "Guidance", "Seed", "Size", "Image"):
        control = page.get_by_label(label, exact=True)
        control.scroll_into_view_if_needed()
        b = control.bounding_box()
        assert b["x"] >= 0 and b["x"] + b["width"] <= 390, f"{label} is cut off"
    generate_button = page.get_by_role("button", name="Generate")
    generate_button.scroll_into_view_if_needed()
    assert generate_button.bounding_box()["height"] >= 40, "Generate is too small to tap"

    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "blue.png")
    page.get_by_label("Image", exact=True).set_input_files(tmp_path / "blue.png")
    mask = page.locator("#mask-canvas")
    mask.wait_for(state="visible")
    mask.scroll_into_view_if_needed()
    box = mask.bounding_box()
    page.touchscreen.tap(box["x"] + box["width"] / 4, box["y"] + box["height"] / 4)
    painted = mask.evaluate("c => c.getContext('2d').getImageData(16, 16, 1, 1).data[3]")
    assert painted == 255, "a tap on the picture did not paint the mask"
    assert not page.errors, page.errors
