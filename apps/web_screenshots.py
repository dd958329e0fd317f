"""Re-make the README's screenshots of the `edge serve` page, on a laptop-sized and a phone-sized screen.

    .venv/bin/python apps/web_screenshots.py [--bundle DIR] [--out benchmarks/images]

Starts `edge serve` on a free loopback port (the default model, converted into a temporary folder unless
--bundle is given; a fresh, empty gallery), generates the default model's three demo scenes in a headless
Chromium at 1280x800, then one more at 390x844, and saves serve_laptop.png and serve_phone.png (full pages).
Needs Debian's chromium (/usr/bin/chromium, or --chromium) and `pip install playwright`; downloads nothing.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCENES = ["a red circle on a blue background", "a large yellow square on a black background",
          "a large green triangle on a white background"]


def start_server(bundle: Path, outputs: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`edge serve BUNDLE` on a free loopback port, once it answers /api/info."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", str(bundle), "--port", str(port),
                             "--outputs", str(outputs)], cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(url + "/api/info", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"edge serve did not start:\n{log.read_text()}")
            time.sleep(0.2)


def generate(page, prompt: str, seed: int, steps: int) -> None:
    """Fill the form, click Generate, wait until the image is in the gallery."""
    count = page.locator("#gallery li").count()
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Steps").fill(str(steps))
    page.get_by_label("Seed").fill(str(seed))
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function(f"document.querySelectorAll('#gallery li').length > {count}", timeout=120_000)
    page.wait_for_function("[...document.images].every((i) => i.complete)")


def open_page(browser, url: str, **context):
    page = browser.new_context(**context).new_page()
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('scheduler').options.length > 0")
    return page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle folder (default: convert the default model)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "images", help="where the PNGs go")
    parser.add_argument("--chromium", type=Path, default=Path("/usr/bin/chromium"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not args.chromium.is_file():
        raise SystemExit(f"no Chromium at {args.chromium}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = args.bundle
        if bundle is None:
            bundle = tmp / "default"  # the page shows the folder name
            subprocess.run([sys.executable, "-m", "edge.cli", "convert", "default", "-o", str(bundle)],
                           cwd=REPO, check=True, capture_output=True)
        proc, url = start_server(bundle, tmp / "outputs", tmp / "server.log")
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(args.chromium), headless=True)
                laptop = open_page(browser, url, viewport={"width": 1280, "height": 800})
                for seed, prompt in enumerate(SCENES):
                    generate(laptop, prompt, seed, args.steps)
                args.out.mkdir(parents=True, exist_ok=True)
                laptop.screenshot(path=args.out / "serve_laptop.png", full_page=True)
                phone = open_page(browser, url, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
                generate(phone, SCENES[0], 3, args.steps)
                phone.screenshot(path=args.out / "serve_phone.png", full_page=True)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"wrote {args.out / 'serve_laptop.png'} and {args.out / 'serve_phone.png'}")


if __name__ == "__main__":
    main()
