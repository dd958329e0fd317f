"""`edge serve` as a client sees it: a real server process on a loopback port, the default model, a real HTTP
client (httpx). A1111's endpoints with their own field names, the page's API, every limit, the queue, cancel,
interrupt, a client that disconnects, failing jobs, the gallery's path checks, a restart, and the token rule
on a non-loopback address (inside a network namespace this test makes: no traffic leaves the machine).

One server for most tests (two copies of the default bundle, a memory budget, small limits); jobs that must
still be running when the test looks are 128x128 with many steps (~0.06 s a step here) and are stopped early.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from conftest import REPO

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")
pytest.importorskip("uvicorn", reason="edge serve needs the serve extra (pip install -e '.[serve]')")
from servers import start, stop  # noqa: E402

LIMITS = {"--queue": 2, "--max-steps": 400, "--max-pixels": 1024 * 1024, "--max-side": 2048, "--max-batch": 3,
          "--max-body": "1MB", "--max-prompt-chars": 300}
BUDGET = "300MB"  # 64x64 and 128x128 fit; 1024x1024 does not (the failing-job test)
LONG = {"prompt": "a red circle", "steps": 400, "width": 128, "height": 128}  # runs for half a minute unless stopped


# ------------------------------------------------------------------------------------------------ servers


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The default model as a bundle (with memory measurements: the server runs under a budget)."""
    from edge.converters.convert import Options, convert

    out = tmp_path_factory.mktemp("serve") / "alpha"
    convert("default", out, options=Options(tiled_vae=False), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    """Bundles alpha and beta (a copy: switching between them loads and unloads), a budget, small limits."""
    root = bundle.parent
    beta = root / "beta"
    shutil.copytree(bundle, beta)
    log = root / "server.log"
    limits = [str(v) for kv in LIMITS.items() for v in kv]
    proc, url = start([bundle, beta], root / "outputs", log, "--memory-budget", BUDGET, "--threads", "1", *limits)
    with httpx.Client(base_url=url, timeout=60) as client:
        yield {"url": url, "client": client, "outputs": root / "outputs", "log": log, "root": root}
    text = stop(proc, log)
    assert "Traceback" not in text and "ERROR" not in text, f"the server logged an error:\n{text}"


def picture(width: int = 64, height: int = 64, color=(30, 60, 200)) -> Image.Image:
    """A blue picture with a red square in its top-left corner."""
    im = Image.new("RGB", (width, height), color)
    im.paste((220, 30, 30), (4, 4, width // 3, height // 3))
    return im


def b64png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def decode(text: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(text.split(",")[-1])))
    im.load()
    return im


def wait_idle(client, timeout: float = 20) -> None:
    """Until the worker runs nothing and nothing waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = client.get("/api/info").json()["queue"]
        if not queue["running"] and not queue["waiting"]:
            return
        time.sleep(0.1)
    raise AssertionError("the server stayed busy")


def wait_state(client, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}: {job}")


def wait_running(client, job_id: str, step: int = 1) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] == "running" and job["step"] >= step:
            return job
        assert job["state"] in ("queued", "running"), job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never ran")


def events(response) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of a server-sent event stream."""
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            yield name, json.loads(line[6:])


# ------------------------------------------------------------------------------------------ A1111's API


def test_txt2img_with_a1111_fields(server):
    c = server["client"]
    body = {"prompt": "a red circle on a blue background", "negative_prompt": "green", "steps": 4,
            "sampler_name": "Euler a", "cfg_scale": 7, "seed": 123, "width": 64, "height": 64, "batch_size": 2,
            "n_iter": 1, "restore_faces": False, "override_settings": {}, "not_an_a1111_field": [1, 2]}
    r = c.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    assert set(d) == {"images", "parameters", "info"}
    info = json.loads(d["info"])
    assert info["seed"] == 123 and info["all_seeds"] == [123, 124]  # A1111: image k has seed + k
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 7 and info["sd_model_name"] == "alpha"
    assert d["parameters"]["prompt"] == body["prompt"] and d["parameters"]["seed"] == 123
    assert "not_an_a1111_field" not in d["parameters"]  # ignored, as pydantic ignores it
    assert len(d["images"]) == 2
    for k, text in enumerate(d["images"]):
        im = decode(text)
        assert im.size == (64, 64) and im.format == "PNG"
        assert "Seed: %d" % (123 + k) in im.text["parameters"]  # the A1111 infotext chunk
        assert info["infotexts"][k] == im.text["parameters"]
        assert json.loads(im.text["edge"])["scheduler"] == "euler_a"
    from edge.png import read_params

    saved = {read_params(p)["seed"] for p in server["outputs"].glob("*.png")}
    assert {123, 124} <= saved  # on disk, with the parameters


def test_img2img_with_a_mask(server):
    c = server["client"]
    start = picture()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 32, 64, 64))  # repaint the bottom-right quarter only
    body = {"prompt": "a yellow square", "init_images": [b64png(start)], "mask": b64png(mask),
            "denoising_strength": 0.9, "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False,
            "steps": 6, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "seed": 5, "width": 64, "height": 64}
    r = c.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    out = decode(d["images"][0]).convert("RGB")
    info = json.loads(d["info"])
    assert info["denoising_strength"] == 0.9 and info["sampler_name"] == "DPM++ 2M Karras"
    assert d["parameters"]["init_images"] is None  # A1111 drops them from the echo unless include_init_images
    assert out.crop((0, 0, 32, 32)).tobytes() == start.crop((0, 0, 32, 32)).tobytes()  # kept: pasted back
    assert out.crop((36, 36, 64, 64)).tobytes() != start.crop((36, 36, 64, 64)).tobytes()  # repainted
    params = json.loads(decode(d["images"][0]).text["edge"])
    assert params["mask"] is True and params["strength"] == 0.9 and params["scheduler"] == "dpmpp_2m_karras"


def test_samplers_schedulers_and_models(server):
    c = server["client"]
    names = {s["name"] for s in c.get("/sdapi/v1/samplers").json()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS", "LCM"} <= names
    assert {s["name"] for s in c.get("/sdapi/v1/schedulers").json()} == {"automatic", "karras"}
    models = c.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["alpha", "beta"]
    assert all(m["title"] == f"{m['model_name']} [{m['hash']}]" for m in models)
    r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "sampler_name": "k_dpmpp_2m_ka"})  # an alias
    assert r.status_code == 200 and json.loads(r.json()["info"])["sampler_name"] == "DPM++ 2M Karras"
    r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "UniPC"})
    assert r.status_code == 404 and "UniPC" in r.json()["detail"]  # as A1111: "Sampler not found"
    r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Euler", "scheduler": "Karras"})
    assert r.status_code == 422 and "DPM++ 2M" in r.json()["detail"][0]["msg"]
    assert c.get("/sdapi/v1/upscalers").json() == []
    assert c.get("/sdapi/v1/memory").json()["ram"]["total"] > 0


def test_progress_while_running_then_interrupt(server):
    c = server["client"]
    wait_idle(c)
    assert c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
    answer: dict = {}
    thread = threading.Thread(target=lambda: answer.update(r=c.post("/sdapi/v1/txt2img", json={**LONG, "seed": 9})))
    thread.start()
    deadline = time.monotonic() + 60
    while True:
        p = c.get("/sdapi/v1/progress").json()
        if p["state"]["sampling_step"] >= 2 and p["current_image"]:
            break
        assert time.monotonic() < deadline, p
        time.sleep(0.05)
    assert p["state"]["sampling_steps"] == 400 and 0 < p["progress"] < 1 and p["eta_relative"] > 0
    assert decode(p["current_image"]).format == "PNG"
    assert c.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()["current_image"] is None
    assert c.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(30)
    r = answer["r"]
    assert r.status_code == 200, r.text
    stopped = json.loads(r.json()["info"])["extra_generation_params"]["Stopped at step"]
    assert 2 <= stopped < 400
    assert decode(r.json()["images"][0]).size == (128, 128)  # the image as far as it got


def test_skip_stops_only_the_current_image(server):
    c = server["client"]
    wait_idle(c)
    answer: dict = {}
    body = {**LONG, "steps": 60, "batch_size": 2, "seed": 20}
    thread = threading.Thread(target=lambda: answer.update(r=c.post("/sdapi/v1/txt2img", json=body)))
    thread.start()
    deadline = time.monotonic() + 60
    while (p := c.get("/sdapi/v1/progress").json())["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline, p
        time.sleep(0.05)
    assert p["state"]["job_no"] == 0 and p["state"]["job_count"] == 2
    c.post("/sdapi/v1/skip")
    thread.join(60)
    images = [json.loads(decode(text).text["edge"]) for text in answer["r"].json()["images"]]
    assert [im["seed"] for im in images] == [20, 21]
    assert 2 <= images[0]["stopped_at_step"] < 60 and "stopped_at_step" not in images[1]  # the next one ran whole


def test_options_switch_the_model(server):
    c = server["client"]
    wait_idle(c)
    assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("alpha [")
    beta = next(m["title"] for m in c.get("/sdapi/v1/sd-models").json() if m["model_name"] == "beta")
    r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": beta, "some_other_option": 3})
    assert r.status_code == 200, r.text
    assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == beta
    info = c.get("/api/info").json()
    assert info["current"] == info["loaded"] == "beta"
    r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2})
    assert json.loads(r.json()["info"])["sd_model_name"] == "beta"
    r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "gamma"})
    assert r.status_code == 404 and "gamma" in r.json()["detail"]
    assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "alpha"}).status_code == 200
    log = server["log"].read_text()
    assert log.index("unloading bundle alpha") < log.index(": loading bundle beta")  # never both in memory
    # a request may name its own bundle (A1111's override_settings); it stays loaded afterwards
    r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2,
                                          "override_settings": {"sd_model_checkpoint": "beta"}})
    assert json.loads(r.json()["info"])["sd_model_name"] == "beta"
    assert c.get("/api/info").json()["loaded"] == "beta"


# ------------------------------------------------------------------------------------------------ limits


def test_numbers_sent_as_strings_are_read_as_a1111_reads_them():
    from edge.serve.params import ApiError, take

    assert take({"steps": "20"}, "steps", int) == 20 and take({"cfg_scale": "7.5"}, "cfg_scale", float) == 7.5
    for bad in ("nan", "inf", "high"):
        with pytest.raises(ApiError, match="a finite number"):
            take({"cfg_scale": bad}, "cfg_scale", float)


@pytest.mark.parametrize("body, status, field, words", [
    ({"prompt": "x", "steps": 401}, 422, "steps", "--max-steps"),
    ({"prompt": "x", "steps": "twenty"}, 422, "steps", "a whole number"),
    ({"prompt": "x", "steps": "2.5"}, 422, "steps", "a whole number"),
    ({"prompt": "x", "steps": 2.5}, 422, "steps", "a whole number"),
    ({"prompt": "x", "cfg_scale": "high"}, 422, "cfg_scale", "a finite number"),
    ({"prompt": "x", "width": 512, "height": 4096}, 422, "height", "--max-side"),
    ({"prompt": "x", "width": 2048, "height": 1024}, 422, "width", "--max-pixels"),
    ({"prompt": "x", "width": 1024, "height": 1024}, None, None, None),  # within the limits: the budget decides
    ({"prompt": "x", "width": 72, "height": 64}, 422, "width", "multiple of 16"),
    ({"prompt": "x", "batch_size": 2, "n_iter": 2}, 422, "batch_size", "--max-batch"),
    ({"prompt": "x" * 301}, 422, "prompt", "--max-prompt-chars"),
    ({"prompt": "x", "script_name": "x/y/z plot"}, 422, "script_name", "no scripts"),
    ({"prompt": "x", "init_images": ["not base64!"]}, 422, "init_images", "not base64"),
])
def test_a1111_limits_and_types(server, body, status, field, words):
    c = server["client"]
    route = "/sdapi/v1/img2img" if "init_images" in body else "/sdapi/v1/txt2img"
    if status is None:  # 512x512 passes the limits; the budget refuses it when the job runs: a failing job
        r = c.post(route, json={**body, "steps": 2})
        assert r.status_code == 422 and "memory budget" in r.json()["detail"], r.text[-500:]
        assert c.post(route, json={"prompt": "x", "steps": 2}).status_code == 200  # the next one is served
        return
    r = c.post(route, json=body)
    assert r.status_code == status, r.text[-500:]
    detail = r.json()["detail"]
    assert detail[0]["loc"] == ["body", field] and words in detail[0]["msg"], detail


def test_page_api_limits(server):
    c = server["client"]
    for body, field, words in [({"prompt": "x", "steps": 0}, "steps", ">= 1"),
                               ({"prompt": "x", "guidance": float("inf")}, "guidance", "a finite number"),
                               ({"steps": 4}, "prompt", "required"),
                               ({"prompt": "x", "scheduler": "heun"}, "scheduler", "known: ddim"),
                               ({"prompt": "x", "bundle": "gamma"}, "bundle", "alpha, beta"),
                               ({"prompt": "x", "mask": b64png(picture())}, "mask", "send the picture"),
                               ({"prompt": "x", "image": b64png(picture(2064, 16))}, "image", "more than this server"),
                               ({"prompt": "x", "image": "data:image/png;base64," + b64png(picture())[:48]},
                                "image", "cannot be read")]:
        r = c.post("/api/jobs", content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 404, 422), (body, r.text)
        assert words in r.json()["error"] and r.json().get("field") == field, (body, r.json())
    r = c.post("/api/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = c.post("/api/jobs", json={"prompt": "x", "image": "A" * (1 << 20)})  # past --max-body 1MB
    assert r.status_code == 413 and "--max-body" in r.json()["error"]
    chunked = c.post("/sdapi/v1/txt2img", content=iter([b'{"prompt": "', b"x" * (1 << 20), b'"}']))
    assert chunked.status_code == 413  # no Content-Length: refused while reading
    assert c.get("/api/gallery", params={"limit": "ten"}).status_code == 422
    assert c.get("/api/info").status_code == 200  # still serving


def test_queue_positions_and_429(server):
    c = server["client"]
    wait_idle(c)
    ids = []
    for position in (0, 1, 2):  # one running, two waiting (--queue 2)
        r = c.post("/api/jobs", json={**LONG, "seed": position})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
        if position == 0:
            wait_running(c, ids[0])
        else:
            assert r.json()["position"] == position
    r = c.post("/api/jobs", json=LONG)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["error"]
    r = c.post("/sdapi/v1/txt2img", json={"prompt": "x"})
    assert r.status_code == 429 and "Retry-After" in r.headers
    assert c.post(f"/api/jobs/{ids[1]}/cancel").json() == {"state": "cancelled"}  # queued: dropped at once
    assert c.get(f"/api/jobs/{ids[2]}").json()["position"] == 1
    for job_id in (ids[2], ids[0]):
        c.post(f"/api/jobs/{job_id}/cancel")
    assert wait_state(c, ids[0])["state"] == "cancelled"
    wait_idle(c)


# ------------------------------------------------------------------------------ the page's API, cancel, disconnect


def test_job_events_preview_and_cancel(server):
    c = server["client"]
    wait_idle(c)
    before = c.get("/api/gallery").json()["total"]
    job = c.post("/api/jobs", json={**LONG, "seed": -1}).json()
    assert job["seed"] >= 0  # -1 chose one, reported
    seen = []
    with c.stream("GET", f"/api/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for name, data in events(stream):
            seen.append(name)
            if name == "progress" and data.get("preview", "").startswith("data:image/png;base64,") and data["step"] >= 2:
                assert data["steps"] == 400
                assert decode(data["preview"]).format == "PNG"
                assert c.post(f"/api/jobs/{job['id']}/cancel").json()["state"] == "cancelled"
        assert seen[-1] == "cancelled"  # the stream ended after its final event
    assert seen[0] in ("queued", "progress")
    final = c.get(f"/api/jobs/{job['id']}").json()
    assert final["state"] == "cancelled" and final["image"] is None
    assert c.get("/api/gallery").json()["total"] == before  # a cancelled job leaves no image
    done = c.post("/api/jobs", json={"prompt": "a red circle", "steps": 3}).json()
    assert wait_state(c, done["id"])["state"] == "done"  # and the server serves the next


def test_page_job_with_image_and_mask(server):
    c = server["client"]
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # painted strokes on a transparent layer
    mask.paste((255, 255, 255, 255), (40, 40, 64, 64))
    body = {"prompt": "a yellow square", "steps": 4, "seed": 3, "strength": 0.8, "mask_blur": 1,
            "image": "data:image/png;base64," + b64png(picture()), "mask": "data:image/png;base64," + b64png(mask)}
    job = c.post("/api/jobs", json=body).json()
    with c.stream("GET", f"/api/jobs/{job['id']}/events") as stream:
        last = list(events(stream))[-1]
    assert last[0] == "done", last
    image = last[1]["image"]
    assert image["params"]["mask"] is True and image["params"]["seed"] == 3
    png = c.get(image["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)


def test_client_disconnect_mid_job(server):
    c = server["client"]
    wait_idle(c)
    before = c.get("/api/gallery").json()["total"]
    with pytest.raises(httpx.ReadTimeout):  # an A1111 client that gives up: its job is cancelled
        httpx.post(server["url"] + "/sdapi/v1/txt2img", json=LONG, timeout=1.5)
    wait_idle(c)
    assert c.get("/api/gallery").json()["total"] == before
    # a page that closes its event stream: the job goes on and its image is kept
    job = c.post("/api/jobs", json={**LONG, "steps": 12, "width": 128, "height": 128}).json()
    with c.stream("GET", f"/api/jobs/{job['id']}/events") as stream:
        next(name for name, _ in events(stream) if name == "progress")
    assert wait_state(c, job["id"])["state"] == "done"
    assert c.get("/api/gallery").json()["total"] == before + 1


def test_failing_job_leaves_the_server_serving(server):
    c = server["client"]
    r = c.post("/sdapi/v1/txt2img", json={"prompt": "a (red circle", "steps": 2})  # fails inside the run
    assert r.status_code == 422 and "never closed" in r.json()["detail"], r.text
    job = c.post("/api/jobs", json={"prompt": "a (red circle", "steps": 2, "prompt_syntax": "a1111"}).json()
    failed = wait_state(c, job["id"])
    assert failed["state"] == "failed" and "never closed" in failed["error"]
    assert c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2}).status_code == 200


# ------------------------------------------------------------------------------------------ the gallery


def test_gallery_lists_and_guards_its_folder(server, tmp_path):
    c = server["client"]
    listing = c.get("/api/gallery", params={"limit": 3}).json()
    assert listing["total"] >= 3 and len(listing["images"]) == 3
    created = [im["created"] for im in listing["images"]]
    assert created == sorted(created, reverse=True)  # newest first
    first = listing["images"][0]
    assert first["params"]["prompt"] and first["url"] == f"/api/gallery/{first['name']}"
    r = c.get(first["url"], params={"download": "1"})
    assert r.status_code == 200 and r.headers["content-disposition"].startswith("attachment")
    secret = tmp_path / "secret.png"
    picture().save(secret)
    (server["outputs"] / "link.png").symlink_to(secret)  # a link out of the folder
    for name in ("link.png", "..%2Fserver.log", "%2Fetc%2Fpasswd", "..%2F..%2F..%2Fetc%2Fpasswd", "x.txt",
                 "nothing-here.png"):
        r = c.get("/api/gallery/" + name)
        assert r.status_code in (400, 404), (name, r.status_code, r.text[:100])
        assert r.headers["content-type"] == "application/json"
    raw = httpx.get(server["url"] + "/api/gallery/../server.log")  # httpx normalises it away: /api/server.log
    assert raw.status_code == 404
    assert "link.png" not in {im["name"] for im in c.get("/api/gallery", params={"limit": 500}).json()["images"]}
    assert c.delete(f"/api/gallery/{first['name']}").json() == {"deleted": first["name"]}
    assert c.get(first["url"]).status_code == 404


def test_page_is_served(server):
    c = server["client"]
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert c.get("/static/app.js").status_code == 200
    assert c.get("/static/../../cli.py").status_code == 404
    r = c.get("/api/info", headers={"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers  # no CORS unless --cors


def test_restart_keeps_the_gallery(bundle, tmp_path):
    outputs, log = tmp_path / "outputs", tmp_path / "restart.log"
    proc, url = start([bundle], outputs, log, "--cors", "http://phone.example")
    try:
        preflight = httpx.options(url + "/api/jobs", headers={"Origin": "http://phone.example",
                                                              "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "http://phone.example"
        job = httpx.post(url + "/api/jobs", json={"prompt": "a red circle", "steps": 3, "seed": 42}).json()
        wait_state(httpx.Client(base_url=url), job["id"])
        before = httpx.get(url + "/api/gallery").json()
    finally:
        text = stop(proc, log)
    assert "Traceback" not in text
    proc, url = start([bundle], outputs, log)
    try:
        after = httpx.get(url + "/api/gallery").json()
    finally:
        stop(proc, log)
    assert after == before and after["images"][0]["params"]["seed"] == 42
    assert not [p for p in outputs.iterdir() if p.name.startswith(".")]  # no temporary files left


# ------------------------------------------------------------------------------ the token on a non-loopback bind

NETNS_PROBE = r"""
import json, subprocess, sys, time, httpx
bundle, outputs, log = sys.argv[1:4]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "addr", "add", "10.77.0.1/32", "dev", "lo"], check=True)  # this namespace's own address
server = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", bundle, "--host", "10.77.0.1", "--port",
                           "7860", "--outputs", outputs], stdout=open(log, "w"), stderr=subprocess.STDOUT)
url, out = "http://10.77.0.1:7860", {}
try:
    for _ in range(300):
        try:
            httpx.get(url + "/api/info", timeout=2)
            break
        except httpx.TransportError:
            time.sleep(0.2)
    token = next(l.split()[2] for l in open(log) if "access token:" in l)
    for path in ("/", "/api/info", "/static/app.js", "/api/gallery", "/sdapi/v1/sd-models"):
        out["none " + path] = httpx.get(url + path).status_code
    out["txt2img none"] = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}).status_code
    out["wrong"] = httpx.get(url + "/api/info", headers={"Authorization": "Bearer nope"}).status_code
    out["bearer"] = httpx.get(url + "/api/info", headers={"Authorization": "Bearer " + token}).status_code
    page = httpx.get(url + "/", params={"token": token})
    out["query"], out["cookie set"] = page.status_code, "edge_token" in page.cookies
    out["cookie"] = httpx.get(url + "/static/app.js", cookies={"edge_token": token}).status_code
    out["txt2img bearer"] = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2},
                                       headers={"Authorization": "Bearer " + token}, timeout=60).status_code
    out["printed"] = any(f"/?token={token}" in l for l in open(log))
finally:
    server.terminate()
    server.wait(20)
print(json.dumps(out))
"""


def test_non_loopback_bind_needs_the_token(bundle, tmp_path):
    """In a new network namespace with an address of its own (only this test's processes are in it): a server
    bound there generates a token, prints it, and refuses every request without it."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2) to make a network namespace")
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here (unshare --net: {probe.stderr.strip()}); "
                    "it needs root or user namespaces")
    log = tmp_path / "netns.log"
    proc = subprocess.run(["unshare", "--net", sys.executable, "-c", NETNS_PROBE, str(bundle), str(tmp_path / "out"),
                           str(log)], capture_output=True, text=True, cwd=REPO, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, f"{proc.stderr}\n{log.read_text() if log.exists() else ''}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    refused = {k: v for k, v in out.items() if k.startswith("none ") or k in ("txt2img none", "wrong")}
    assert set(refused.values()) == {401}, out
    assert out["bearer"] == out["query"] == out["cookie"] == out["txt2img bearer"] == 200, out
    assert out["cookie set"] and out["printed"], out
    assert "Traceback" not in log.read_text()
