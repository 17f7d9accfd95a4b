"""`wan-rt serve` end to end: real servers on 127.0.0.1 (ephemeral ports) driven by the official
`openai` client, raw HTTP and a headless Chromium; tiny models, a few steps, small sizes.

Every server runs in its own process group and is killed in teardown; every wait has a timeout.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
av = pytest.importorskip("av")

# The official client marks its video methods deprecated (OpenAI's own service); they work here.
pytestmark = [pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning"), pytest.mark.slow]

READY_TIMEOUT_S = 180
JOB_TIMEOUT_S = 180
KEY = "test-key-0123456789"


# ----------------------------------------------------------------------------- a server process
class Server:
    """`wan-rt serve --port 0 ...` in its own process group; `url` once it listens."""

    def __init__(self, data_dir: Path, *args: str):
        self.data_dir = Path(data_dir)
        self.args = ["serve", "--port", "0", "--data-dir", str(self.data_dir), "--log-level", "warning", *args]
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, wait_ready: bool = True) -> "Server":
        code = "import sys; from wan_rt.cli import main; sys.exit(main(sys.argv[1:]))"
        # cwd outside the checkout: no ./engines, and the repo root never lands on sys.path.
        self.proc = subprocess.Popen([sys.executable, "-c", code, *self.args], cwd=self.data_dir.parent,
                                     stdout=subprocess.PIPE, stderr=open(self.log, "ab"), text=True,
                                     start_new_session=True)
        line = _readline(self.proc, timeout=120)
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert match, f"no listening line from wan-rt serve: {line!r}\n{self.log.read_text()[-3000:]}"
        self.url = match[1]
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            status, _, body = http("GET", self.url + "/readyz")
            if status == 200 and all(w["ready"] for w in body["workers"]):
                return body
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"workers not ready after {READY_TIMEOUT_S} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """kill -9 of the whole process group (the service and its workers)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def client(self, key: str = "unused", **kwargs) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, timeout=60, **kwargs)


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, dict, object]:
    """-> (status, headers, JSON body or bytes); 4xx/5xx are returned, not raised."""
    headers = dict(headers or {})
    if isinstance(body, dict):
        body, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        status, head, raw = err.code, dict(err.headers), err.read()
    if head.get("content-type", head.get("Content-Type", "")).startswith("application/json"):
        return status, head, json.loads(raw)
    return status, head, raw


def decode(mp4: bytes) -> np.ndarray:
    """-> frames [F, H, W, 3] uint8, decoded by PyAV (FFmpeg), not by wan_rt."""
    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def png(color=(20, 120, 200), size=(40, 40)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_openai_error(body, status: int, got: int, message: str, param=None, code=None) -> None:
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"].startswith(message), body
    assert body["error"]["param"] == param and body["error"]["code"] == code, body


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny T2V default on two CPU workers, a 1 MB upload limit."""
    srv = Server(tmp_path_factory.mktemp("serve") / "data", "--devices", "cpu,cpu", "--max-upload-mb", "1")
    try:
        yield srv.start()
    finally:
        srv.kill()


# ----------------------------------------------------------------------------- the openai client
def test_openai_client_round_trip(server):
    client = server.client()
    wan_fields = {"num_frames": 9, "num_inference_steps": 3, "seed": 11, "guidance_scale": 3.0,
                  "guidance_scale_2": 2.0, "shift": 5.0, "solver": "euler", "negative_prompt": "blurry"}
    video = client.videos.create_and_poll(prompt="a fox in the snow", size="48x32", poll_interval_ms=100,
                                          extra_body=wan_fields)
    assert video.status == "completed" and video.progress == 100 and video.error is None
    assert (video.object, video.model, video.size, video.seconds) == ("video", "tiny-t2v-A14B", "48x32", "0.5625")
    assert {k: video.model_extra[k] for k in wan_fields} == wan_fields
    assert video.completed_at >= video.created_at and video.expires_at > video.completed_at
    assert client.videos.retrieve(video.id).status == "completed"

    frames = decode(client.videos.download_content(video.id).content)
    assert frames.shape == (9, 32, 48, 3)
    from PIL import Image

    thumbnail = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="thumbnail").content))
    assert (thumbnail.format, thumbnail.size) == ("WEBP", (48, 32))
    sheet = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="spritesheet").content))
    assert (sheet.format, sheet.size) == ("JPEG", (4 * 48, 3 * 32))  # 9 frames, 4 to a row

    # A field that OpenAI's `seconds` and wan_rt's `num_frames` both set: num_frames wins.
    both = client.videos.create(prompt="which wins", seconds="0.5625", extra_body={"num_frames": 5,
                                                                                  "num_inference_steps": 1})
    assert both.model_extra["num_frames"] == 5 and both.seconds == "0.3125"
    only_seconds = client.videos.create(prompt="seconds", seconds="0.5", extra_body={"num_inference_steps": 1})
    assert only_seconds.model_extra["num_frames"] == 9  # 16 fps -> the nearest 4k+1

    everything = {v.id for v in client.videos.list(limit=100)}
    paged = [v.id for v in client.videos.list(limit=1)]  # the client follows after=last_id while has_more
    assert len(paged) == len(everything) >= 3 and set(paged) == everything
    newest_first = client.videos.list(limit=2, order="desc")
    assert newest_first.has_more and [v.id for v in newest_first.data] == [only_seconds.id, both.id]
    oldest = client.videos.list(limit=1, order="asc", after=video.id).data[0].id
    assert oldest == both.id or oldest in everything

    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)
    assert not list((server.data_dir / "videos").glob(f"{video.id}*"))
    for job in (both, only_seconds):
        client.videos.delete(job.id)


def test_same_request_same_seed_same_video(server):
    """Same request + seed -> the same frames, whichever worker runs it; another seed differs."""
    client = server.client()
    body = {"num_inference_steps": 3, "seed": 123}
    jobs = [client.videos.create(prompt="the same video twice", extra_body=body) for _ in range(2)]
    other = client.videos.create(prompt="the same video twice", extra_body={**body, "seed": 124})
    videos = [client.videos.poll(j.id, poll_interval_ms=100) for j in (*jobs, other)]
    assert [v.status for v in videos] == ["completed"] * 3
    first, second, third = (decode(client.videos.download_content(v.id).content) for v in videos)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, third)


def test_eight_concurrent_clients(server):
    """8 clients at once, each its own size and frame count: all finish with a decodable mp4 of
    exactly what it asked for."""
    asks = [("32x32", 1), ("48x32", 5), ("32x48", 9), ("64x32", 5), ("32x32", 9), ("48x48", 1), ("32x64", 5),
            ("48x32", 9)]

    def one(ask: tuple[str, int]) -> tuple[tuple, tuple]:
        size, frames = ask
        client = server.client()
        video = client.videos.create_and_poll(prompt=f"clip {size} {frames}", size=size, poll_interval_ms=200,
                                              extra_body={"num_frames": frames, "num_inference_steps": 2})
        assert video.status == "completed", video.error
        width, height = map(int, size.split("x"))
        return (frames, height, width, 3), decode(client.videos.download_content(video.id).content).shape

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(one, ask) for ask in asks]
        results = [f.result(timeout=JOB_TIMEOUT_S * 2) for f in futures]
    for asked, got in results:
        assert got == asked


def test_progress_as_server_sent_events(server):
    client = server.client()
    job = client.videos.create(prompt="progress", extra_body={"num_inference_steps": 30})
    request = urllib.request.Request(f"{server.url}/v1/videos/{job.id}/events")
    events = []
    with urllib.request.urlopen(request, timeout=JOB_TIMEOUT_S) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for raw in stream:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    progress = [e["progress"] for e in events]
    assert events[-1]["status"] == "completed" and progress[-1] == 100
    assert progress == sorted(progress) and any(0 < p < 100 for p in progress), progress
    assert all(e["id"] == job.id and e["object"] == "video" for e in events)


def test_cancel_a_queued_and_a_running_job(server):
    """Both workers busy with long jobs, one queued: DELETE removes the queued one at once and
    stops a running one at a step boundary; both ids answer 404 afterwards."""
    client = server.client()
    long_jobs = [client.videos.create(prompt=f"long {i}", extra_body={"num_inference_steps": 400}) for i in range(2)]
    queued = client.videos.create(prompt="never runs", extra_body={"num_inference_steps": 2})
    wait_for(lambda: all(client.videos.retrieve(j.id).progress > 0 for j in long_jobs), JOB_TIMEOUT_S,
             "both long jobs to be running")
    assert client.videos.retrieve(queued.id).status == "queued"

    def stopped(outcome: str) -> float:
        _, _, metrics = http("GET", server.url + "/metrics")
        found = re.search(rf'wan_rt_job_seconds_count{{outcome="{outcome}"}} (\S+)', metrics.decode())
        return float(found[1]) if found else 0.0

    before = stopped("deleted")
    for job in (queued, *long_jobs):
        assert client.videos.delete(job.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(job.id)
    # The workers stop the generations (not run them to the end): 400 steps take far longer.
    wait_for(lambda: stopped("deleted") >= before + 2, 60, "the running jobs to stop")
    assert all(w["job"] is None for w in http("GET", server.url + "/readyz")[2]["workers"])
    assert not [p for j in (queued, *long_jobs) for p in (server.data_dir / "videos").glob(f"{j.id}*")]


# ----------------------------------------------------------------------------- bad input
def test_bad_requests_get_openai_errors(server, tmp_path, capsys):
    client = server.client(max_retries=0)

    def refused(status: int, message: str, param=None, code=None, **create) -> None:
        with pytest.raises(openai.APIStatusError) as err:
            client.videos.create(**{"prompt": "x", **create})
        assert_openai_error({"error": err.value.body}, status, err.value.status_code, message, param, code)

    size_words = "width and height must be positive multiples of 16 for tiny-t2v-A14B; got width 40, height 32"
    refused(400, size_words, "size", size="40x32")
    refused(400, "size must be WIDTHxHEIGHT, e.g. 832x480; got 'abc'", "size", size="abc")
    refused(400, "num_frames must be 4k+1 (1, 5, 9, ..., 81); got 6", "num_frames", extra_body={"num_frames": 6})
    refused(400, "num_inference_steps must be >= 1; got 0", "num_inference_steps",
            extra_body={"num_inference_steps": 0})
    refused(400, "seed must be an integer; got 'abc'", "seed", extra_body={"seed": "abc"})
    refused(400, "unknown parameter 'steps'", "steps", extra_body={"steps": 4})
    refused(400, "model 'sora-2' is not served here; this server serves 'tiny-t2v-A14B'", "model",
            "model_not_found", model="sora-2")
    refused(400, "tiny-t2v-A14B is a text-to-video model; input_reference needs an i2v or ti2v model",
            "input_reference", input_reference=("frame.png", png(), "image/png"))
    refused(400, "seconds must be one of 0.0625, 0.3125, 0.5625 or a number of seconds up to 0.5625 on this "
                 "server; got 4.0", "seconds", seconds="4")  # 65 frames: more than this server makes (9)
    refused(413, "the request is larger than the 1 MB upload limit", None, "request_too_large",
            input_reference=("big.png", os.urandom(2 * 2**20), "image/png"))

    # The same words as the CLI: `wan-rt run` refuses the same size before loading anything.
    from wan_rt.cli import main

    assert main(["run", "--width", "40", "--height", "32", "--output", str(tmp_path / "x.mp4")]) == 2
    assert capsys.readouterr().err.strip() == f"wan-rt run: error: {size_words}"

    url = server.url + "/v1/videos"
    expect_error(http("POST", url, {"size": "32x32"}), 400, "prompt is required", "prompt")
    expect_error(http("POST", url, b"{nope", {"Content-Type": "application/json"}), 400,
                 "the body is not valid JSON")
    expect_error(http("POST", url, {"prompt": "x", "input_reference": {"image_url": "data:image/png;base64,AA"}}),
                 400, "tiny-t2v-A14B is a text-to-video model; input_reference needs an i2v or ti2v model",
                 "input_reference")
    for path in ("/v1/videos/video_nope", "/v1/videos/video_nope/content", "/v1/videos/video_nope/events"):
        expect_error(http("GET", server.url + path), 404, "no video with id 'video_nope'", code="not_found")
    expect_error(http("DELETE", url + "/video_nope"), 404, "no video with id 'video_nope'", code="not_found")
    expect_error(http("GET", url + "?limit=0"), 400, "limit: Input should be greater than or equal to 1; got '0'",
                 "limit")
    expect_error(http("GET", url + "?after=video_nope"), 404, "no video with id 'video_nope'", code="not_found")
    expect_error(http("GET", server.url + "/v1/nothing"), 404, "not found")
    expect_error(http("GET", url + "/video_nope/content?variant=gif"), 400,
                 "variant: Input should be 'video', 'thumbnail' or 'spritesheet'; got 'gif'", "variant")

    waiting = client.videos.create(prompt="not done yet", extra_body={"num_inference_steps": 400})
    expect_error(http("GET", f"{url}/{waiting.id}/content"), 409, f"video {waiting.id} is ", code="video_not_ready")
    client.videos.delete(waiting.id)


def expect_error(response: tuple, status: int, message: str, param=None, code=None) -> None:
    got, _, body = response
    assert_openai_error(body, status, got, message, param, code)


# ----------------------------------------------------------------------------- operations
def test_health_ready_and_metrics(server):
    assert http("GET", server.url + "/healthz")[:3:2] == (200, {"status": "ok"})
    status, _, ready = http("GET", server.url + "/readyz")
    assert status == 200 and ready["ready"] and ready["model"] == "tiny-t2v-A14B"
    assert [w["device"] for w in ready["workers"]] == ["cpu", "cpu"] and all(w["pid"] for w in ready["workers"])
    client = server.client()
    client.videos.create_and_poll(prompt="for the metrics", poll_interval_ms=100,
                                  extra_body={"num_inference_steps": 2})
    status, head, body = http("GET", server.url + "/metrics")
    text = body.decode()
    assert status == 200 and head["content-type"].startswith("text/plain")
    for name in ("wan_rt_queue_depth ", 'wan_rt_jobs{status="completed"}', 'wan_rt_stage_seconds_bucket{le=',
                 'stage="dit_high_noise"', 'stage="vae_decoder"', 'wan_rt_steps_per_second{device="cpu"}',
                 'wan_rt_workers_ready{model="tiny-t2v-A14B"} 2.0', 'wan_rt_job_seconds_count{outcome="completed"}'):
        assert name in text, name
    assert all(line.startswith(("#", "wan_rt_")) or not line for line in text.splitlines())
    completed = float(re.search(r'wan_rt_jobs\{status="completed"\} (\S+)', text)[1])
    assert completed == sum(1 for v in client.videos.list(limit=100) if v.status == "completed")


def test_a_killed_worker_is_restarted_and_its_job_reruns(server):
    """kill -9 of the worker running a job: the API keeps answering, the worker comes back, the
    job runs again (second attempt) and completes."""
    client = server.client()
    job = client.videos.create(prompt="survives its worker", extra_body={"num_inference_steps": 30})
    running = wait_for(lambda: next((w for w in http("GET", server.url + "/readyz")[2]["workers"]
                                     if w["job"] == job.id), None), JOB_TIMEOUT_S, "a worker to take the job")
    wait_for(lambda: client.videos.retrieve(job.id).progress > 0, JOB_TIMEOUT_S, "the job to make progress")
    os.kill(running["pid"], signal.SIGKILL)
    assert http("GET", server.url + "/healthz")[0] == 200
    done = client.videos.poll(job.id, poll_interval_ms=100)
    assert done.status == "completed" and done.model_extra["attempts"] == 2
    assert done.model_extra["last_error"] == "the worker on cpu was killed by signal 9"
    assert decode(client.videos.download_content(job.id).content).shape == (5, 32, 32, 3)
    workers = server.wait_ready()["workers"]
    assert sorted(w["restarts"] for w in workers) == [0, 1]
    assert running["pid"] not in [w["pid"] for w in workers]


def test_the_page_in_headless_chromium(server, tmp_path):
    """Type a prompt, submit, watch the progress reach 100 and a playable <video> appear."""
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800",
                 "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        browser.set_page_load_timeout(60)
        browser.get(server.url + "/")
        WebDriverWait(browser, 30).until(lambda b: "tiny-t2v-A14B" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "prompt").send_keys("a fox in the snow, from the page")
        browser.find_element(By.ID, "size").send_keys("48x32")
        browser.find_element(By.ID, "steps").send_keys("6")
        browser.find_element(By.ID, "seed").send_keys("5")
        browser.find_element(By.ID, "submit").click()
        card = WebDriverWait(browser, 30).until(lambda b: next(
            (c for c in b.find_elements(By.CSS_SELECTOR, ".job") if "from the page" in c.text), None))
        WebDriverWait(browser, JOB_TIMEOUT_S).until(
            lambda b: card.find_element(By.TAG_NAME, "progress").get_attribute("value") == "100")
        assert card.find_element(By.CLASS_NAME, "status").text == "completed"
        WebDriverWait(browser, 60).until(lambda b: b.execute_script(
            "const v = arguments[0].querySelector('video'); return v && v.readyState >= 2 && v.duration > 0 "
            "&& v.videoWidth == 48 && v.videoHeight == 32", card))
        assert "48x32 · 5 frames · 6 steps · seed 5 · 100%" in card.text
        shot = Path(tempfile.gettempdir()) / "wan_rt_serve_page.png"
        browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
    finally:
        browser.quit()


def test_refuses_a_public_host_without_a_key(capsys, monkeypatch):
    from wan_rt.cli import main

    monkeypatch.delenv("WAN_RT_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("wan-rt serve: error: refusing to serve on 0.0.0.0 without an API key: pass --api-key or set "
                   "WAN_RT_API_KEY (or listen on 127.0.0.1)")


# ----------------------------------------------------------------------------- an image-to-video server with a key
@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """The tiny I2V preset behind an API key, one worker, a queue of one."""
    srv = Server(tmp_path_factory.mktemp("serve-i2v") / "data", "--model", "tiny-i2v-A14B", "--api-key", KEY,
                 "--max-queue", "1")
    try:
        yield srv.start()
    finally:
        srv.kill()


def test_api_key(keyed_server):
    for key, message in ((None, "missing API key"), ("wrong", "incorrect API key")):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for path in ("/v1/videos", "/v1/models", "/metrics"):
            expect_error(http("GET", keyed_server.url + path, headers=headers), 401, message, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        keyed_server.client("wrong", max_retries=0).videos.list()
    assert http("GET", keyed_server.url + "/healthz")[0] == 200
    assert http("GET", keyed_server.url + "/")[0] == 200  # the page; it asks for the key
    assert keyed_server.client(KEY).models.list().data[0].id == "tiny-i2v-A14B"


def test_image_upload_with_the_openai_client(keyed_server):
    client = keyed_server.client(KEY)
    video = client.videos.create_and_poll(prompt="from this frame", input_reference=("frame.png", png(), "image/png"),
                                          poll_interval_ms=100, extra_body={"num_inference_steps": 2, "seed": 1})
    assert video.status == "completed", video.error
    assert decode(client.videos.download_content(video.id).content).shape == (5, 32, 32, 3)
    data_url = "data:image/png;base64," + base64.b64encode(png((200, 40, 40))).decode()
    status, _, body = http("POST", keyed_server.url + "/v1/videos", {
        "prompt": "json and a data URL", "input_reference": {"image_url": data_url}, "num_inference_steps": 2},
        headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200 and body["status"] == "queued"
    assert client.videos.poll(body["id"], poll_interval_ms=100).status == "completed"
    expect_error(http("POST", keyed_server.url + "/v1/videos", {
        "prompt": "x", "input_reference": {"image_url": "https://example.com/a.png"}},
        headers={"Authorization": f"Bearer {KEY}"}), 400,
        "input_reference.image_url must be a base64 data: URL (this server fetches nothing)", "input_reference")

    strict = keyed_server.client(KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        strict.videos.create(prompt="x", input_reference=("frame.png", b"GIF89a but not really", "image/png"))
    assert err.value.body["message"].startswith("input_reference is not an image (PNG, JPEG, WebP...)")
    with pytest.raises(openai.BadRequestError) as err:
        strict.videos.create(prompt="no image")
    assert err.value.body["message"] == "tiny-i2v-A14B is an image-to-video model: pass input_reference"


def test_a_full_queue_answers_429_with_retry_after(keyed_server):
    client = keyed_server.client(KEY, max_retries=0)
    frame = ("frame.png", png(), "image/png")
    running = client.videos.create(prompt="busy", input_reference=frame, extra_body={"num_inference_steps": 400})
    wait_for(lambda: client.videos.retrieve(running.id).status == "in_progress", JOB_TIMEOUT_S, "the worker")
    waiting = client.videos.create(prompt="fills the queue", input_reference=frame)
    with pytest.raises(openai.RateLimitError) as err:
        client.videos.create(prompt="one too many", input_reference=frame)
    assert err.value.status_code == 429 and err.value.body["code"] == "queue_full"
    assert int(err.value.response.headers["retry-after"]) >= 1
    for job in (waiting, running):
        client.videos.delete(job.id)


# ----------------------------------------------------------------------------- durability
def test_kill9_of_the_whole_service_then_restart(tmp_path):
    """kill -9 of the service mid-job and a restart on the same data dir: the finished job is still
    served (same bytes), the interrupted one re-runs (attempt 2), the queued ones run in order."""
    data = tmp_path / "data"
    first = Server(data).start()
    try:
        client = first.client()
        finished = client.videos.create_and_poll(prompt="finished before", poll_interval_ms=100,
                                                 extra_body={"num_inference_steps": 2})
        mp4 = client.videos.download_content(finished.id).content
        interrupted = client.videos.create(prompt="interrupted", extra_body={"num_inference_steps": 60})
        queued = [client.videos.create(prompt=f"queued {i}", extra_body={"num_inference_steps": 2}) for i in range(3)]
        wait_for(lambda: client.videos.retrieve(interrupted.id).progress > 0, JOB_TIMEOUT_S, "the long job to run")
        worker_pids = [w["pid"] for w in http("GET", first.url + "/readyz")[2]["workers"]]
        os.kill(first.proc.pid, signal.SIGKILL)  # the service only: its worker must notice and leave
        first.proc.wait(timeout=30)
        wait_for(lambda: not any(_alive(pid) for pid in worker_pids), 30, "the orphaned worker to exit")
    finally:
        first.kill()

    second = Server(data).start(wait_ready=False)
    try:
        client = second.client()
        assert client.videos.retrieve(finished.id).status == "completed"
        assert client.videos.download_content(finished.id).content == mp4
        ids = [interrupted.id, *(q.id for q in queued)]
        done = [client.videos.poll(i, poll_interval_ms=100) for i in ids]
        assert [v.status for v in done] == ["completed"] * 4
        assert [v.model_extra["attempts"] for v in done] == [2, 1, 1, 1]
        assert done[0].model_extra["last_error"] == "the service stopped while it ran"
        from wan_rt.service.stores import open_store

        store = open_store(str(data / "jobs.sqlite"))  # when each started, from the durable store itself
        started = [store.get(i).started_at for i in ids]
        store.close()
        assert started == sorted(started), "queued jobs run in the order they were submitted"
    finally:
        second.kill()


def _alive(pid: int) -> bool:
    """A zombie (exited, not yet reaped by whoever adopted it) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------- worker groups
GROUP_TIMEOUT_S = 20   # the group's collective timeout; the first group job waits until the group idled longer


@pytest.fixture(scope="module")
def group_server(tmp_path_factory):
    """The tiny T2V default on one worker group: two CPU ranks, Ulysses 2 over gloo."""
    srv = Server(tmp_path_factory.mktemp("serve-group") / "data", "--devices", "cpu,cpu", "--ulysses", "2",
                 "--group-timeout", str(GROUP_TIMEOUT_S))
    try:
        yield srv.start(wait_ready=False)
    finally:
        srv.kill()


def _group(server: Server) -> dict:
    (group,) = http("GET", server.url + "/readyz")[2]["workers"]
    return group


def test_a_group_job_is_the_single_worker_video(group_server, tmp_path):
    """The same request and seed on a 2-rank Ulysses group and on one worker: the same video
    (frames equal to 1e-5 before encoding, as `wan-rt run --ulysses 2`), after the group sat idle
    longer than its collective timeout (no rank may wait in a collective meanwhile)."""
    single = Server(tmp_path / "single", "--devices", "cpu").start(wait_ready=False)
    try:
        group_server.wait_ready()
        idle_since = time.monotonic()
        single.wait_ready()
        ready = http("GET", group_server.url + "/readyz")[2]
        assert ready["model"] == http("GET", single.url + "/readyz")[2]["model"] == "tiny-t2v-A14B"
        assert [(w["device"], len(w["pids"])) for w in ready["workers"]] == [("cpu,cpu", 2)]
        body = {"num_inference_steps": 3, "seed": 21}
        reference = single.client().videos.create_and_poll(prompt="one video, two ranks", poll_interval_ms=100,
                                                          extra_body=body)
        assert reference.status == "completed", reference.error
        time.sleep(max(0.0, idle_since + GROUP_TIMEOUT_S + 2 - time.monotonic()))
        client = group_server.client()
        video = client.videos.create_and_poll(prompt="one video, two ranks", poll_interval_ms=100, extra_body=body)
        other = client.videos.create_and_poll(prompt="one video, two ranks", poll_interval_ms=100,
                                              extra_body={**body, "seed": 22})
        assert [v.status for v in (video, other)] == ["completed"] * 2
        assert video.model_extra["attempts"] == 1 and _group(group_server)["restarts"] == 0
        want = decode(single.client().videos.download_content(reference.id).content)
        got = decode(client.videos.download_content(video.id).content)
        assert want.shape == got.shape == (5, 32, 32, 3) and want.std() > 1
        # an 8-bit value exactly on a rounding edge could flip by one level: not another video
        assert int(abs(want.astype(int) - got.astype(int)).max()) <= 1
        assert not np.array_equal(decode(client.videos.download_content(other.id).content), got)
    finally:
        single.kill()


def test_cancel_a_running_group_job(group_server):
    """DELETE of a job the group runs: every rank stops at the same step (the leader alone would
    leave the other waiting in a collective), and the group takes the next job without a restart."""
    group_server.wait_ready()
    client = group_server.client()
    restarts = _group(group_server)["restarts"]
    job = client.videos.create(prompt="long", extra_body={"num_inference_steps": 400})
    wait_for(lambda: client.videos.retrieve(job.id).progress > 0, JOB_TIMEOUT_S, "the group to run the job")
    assert client.videos.delete(job.id).deleted
    wait_for(lambda: _group(group_server)["job"] is None, 60, "the group to stop the job")
    after = client.videos.create_and_poll(prompt="next", poll_interval_ms=100, extra_body={"num_inference_steps": 2})
    assert after.status == "completed" and after.model_extra["attempts"] == 1
    assert _group(group_server)["restarts"] == restarts
    assert not list((group_server.data_dir / "videos").glob(f"{job.id}*"))


def test_kill9_of_one_rank_restarts_the_group(group_server):
    """kill -9 of rank 1 mid-job: the API keeps answering, the whole group is replaced (rank 0
    too: it may be blocked in a collective), and the job runs again and completes."""
    group_server.wait_ready()
    client = group_server.client()
    before = _group(group_server)
    job = client.videos.create(prompt="survives its rank", extra_body={"num_inference_steps": 30, "seed": 5})
    wait_for(lambda: client.videos.retrieve(job.id).progress > 0, JOB_TIMEOUT_S, "the group to run the job")
    os.kill(before["pids"][1], signal.SIGKILL)
    assert http("GET", group_server.url + "/healthz")[0] == 200
    done = client.videos.poll(job.id, poll_interval_ms=100)
    assert done.status == "completed" and done.model_extra["attempts"] == 2
    assert done.model_extra["last_error"] == "rank 1 of the worker group on cpu,cpu was killed by signal 9"
    assert decode(client.videos.download_content(job.id).content).shape == (5, 32, 32, 3)
    after = _group(group_server)
    assert after["restarts"] == before["restarts"] + 1 and after["last_exit"] == done.model_extra["last_error"]
    assert not any(_alive(pid) for pid in before["pids"]) and not set(after["pids"]) & set(before["pids"])


@pytest.mark.parametrize("args, message", [
    (["--devices", "cpu,cpu,cpu", "--ulysses", "2"],
     "--devices lists 3 device(s), not a multiple of the worker group size 2 (ulysses 2 on 2 processes)"),
    (["--devices", "cpu,cpu,cpu", "--ulysses", "3"],
     "--ulysses 3 does not divide the 2 attention heads of tiny-t2v-A14B; valid Ulysses degrees: 1, 2"),
    (["--devices", "cpu,cpu", "--ring", "0"], "--ring must be a positive integer; got 0"),
    (["--devices", "cpu,cpu", "--ulysses", "2", "--group-timeout", "0"], "--group-timeout must be > 0; got 0"),
])
def test_bad_worker_group_configs_are_one_line_exit_2(tmp_path, capsys, args, message):
    from wan_rt.cli import main

    data = tmp_path / "data"
    assert main(["serve", "--port", "0", "--data-dir", str(data), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"wan-rt serve: error: {message}", err
    assert not data.exists(), "refused before anything started"


def test_worker_groups_split_the_devices():
    """Several groups run several jobs; a group is all CPU or one rank per named GPU."""
    from wan_rt.parallel import ParallelPlan, PlanError
    from wan_rt.service.pool import worker_groups
    from wan_rt.service.served_model import describe

    served = describe("tiny-t2v-A14B")
    assert worker_groups(["cpu", "cpu"], None, served) == [["cpu"], ["cpu"]]
    plan = ParallelPlan(ulysses=2)
    assert worker_groups(["cuda:0", "cuda:1", "cuda:2", "cuda:3"], plan, served) == [["cuda:0", "cuda:1"],
                                                                                   ["cuda:2", "cuda:3"]]
    for devices, message in ((["cpu", "cuda:0"], "a worker group is all cpu or all cuda devices; got cpu,cuda:0"),
                             (["cuda:1", "cuda:1"], "the worker group cuda:1,cuda:1 uses a GPU twice"),
                             (["cuda", "cuda:1"], "name each GPU of a worker group (cuda:0,cuda:1,...); got cuda")):
        with pytest.raises(PlanError, match=re.escape(message)):
            worker_groups(devices, plan, served)


def test_cfg_parallel_refuses_requests_without_guidance(tmp_path):
    """CFG parallel splits cond and uncond over the ranks: a request without guidance is a 400's
    one line at submit, before it is queued (nothing is started to find out)."""
    from wan_rt.parallel import ParallelPlan
    from wan_rt.service import InvalidRequest, VideoRequest, VideoService
    from wan_rt.service.service import GROUP_TIMEOUT_S as DEFAULT_TIMEOUT_S

    service = VideoService(devices=["cpu", "cpu"], data_dir=tmp_path, parallel=ParallelPlan(cfg=2))
    assert service.groups == [["cpu", "cpu"]] and service.plan.timeout_s == DEFAULT_TIMEOUT_S
    with pytest.raises(InvalidRequest) as err:
        service.submit(VideoRequest("no guidance on the second expert", guidance_scale_2=1.0))
    assert str(err.value) == ("--cfg-parallel needs classifier-free guidance (> 1) on every expert; "
                              "guidance is dit_low_noise 1")
    assert err.value.param == "guidance_scale"
