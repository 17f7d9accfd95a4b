"""`wan-rt serve`'s video-in endpoints end to end: remix, edits and extensions from the official
`openai` client against a real server on 127.0.0.1 (the tiny TI2V-5B: it takes text, an image or
a video), mp4s decoded by PyAV; bad uploads; the source kept with the job; the page's buttons."""

from __future__ import annotations

import io
import shutil
from fractions import Fraction

import numpy as np
import pytest

openai = pytest.importorskip("openai")
av = pytest.importorskip("av")

pytestmark = [pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning"), pytest.mark.slow]


STEPS = {"num_inference_steps": 2}


def mp4(frames: int, height: int, width: int, rate: Fraction = Fraction(24), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def serve(serve_helpers):
    return serve_helpers


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve):
    """The tiny TI2V-5B (64x64, 5 frames, 24 fps by default) on one CPU worker, a 1 MB upload limit."""
    srv = serve.Server(tmp_path_factory.mktemp("serve-v2v") / "data", "--model", "tiny-ti2v-5B",
                       "--max-upload-mb", "1")
    try:
        yield srv.start()
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def source(server):
    """A finished 5-frame video to remix, edit and extend."""
    video = server.client().videos.create_and_poll(prompt="a fox in the snow", poll_interval_ms=100,
                                                   extra_body={**STEPS, "seed": 3})
    assert video.status == "completed", video.error
    return video


def test_remix_edit_extend_with_the_openai_client(server, source, serve):
    client = server.client()
    source_mp4 = client.videos.download_content(source.id).content
    source_frames = serve.decode(source_mp4)
    assert source_frames.shape == (5, 64, 64, 3)

    # remix: the source's settings (size, frames, steps, seed), a new prompt
    remixes = [client.videos.remix(source.id, prompt="a cat in the snow", extra_body={"strength": 0.5})
               for _ in range(2)]
    assert remixes[0].status == "queued" and remixes[0].remixed_from_video_id == source.id
    done = [client.videos.poll(r.id, poll_interval_ms=100) for r in remixes]
    assert [d.status for d in done] == ["completed"] * 2, done[0].error
    extra = done[0].model_extra
    assert (done[0].size, extra["num_frames"], extra["seed"], extra["strength"], extra["source"]) == \
           ("64x64", 5, 3, 0.5, "remix")
    remixed = [serve.decode(client.videos.download_content(d.id).content) for d in done]
    assert remixed[0].shape == (5, 64, 64, 3)
    assert np.array_equal(remixed[0], remixed[1]), "same source, prompt and seed: the same video"
    assert not np.array_equal(remixed[0], source_frames)

    # edit: an mp4 upload (multipart, as the client sends it), and a completed video by id (JSON)
    upload = client.videos.edit(prompt="a dog in the snow", video=("clip.mp4", mp4(9, 32, 96), "video/mp4"),
                                extra_body={"strength": 0.7, "size": "96x32", **STEPS})
    by_id = client.post("/videos/edits", cast_to=openai.types.Video,
                        body={"prompt": "a wolf in the snow", "video": {"id": source.id}, **STEPS})
    upload, by_id = (client.videos.poll(v.id, poll_interval_ms=100) for v in (upload, by_id))
    assert upload.status == by_id.status == "completed", (upload.error, by_id.error)
    assert (upload.model_extra["source_video_id"], by_id.model_extra["source_video_id"]) == (None, source.id)
    assert serve.decode(client.videos.download_content(upload.id).content).shape == (9, 32, 96, 3)
    assert serve.decode(client.videos.download_content(by_id.id).content).shape == (5, 64, 64, 3)

    # extend: the source, then 5 new frames (the seam frame once): 9 frames, `seconds` the total
    extended = client.videos.extend(prompt="the fox runs away", seconds=f"{5 / 24:g}",
                                    video=("clip.mp4", source_mp4, "video/mp4"), extra_body=STEPS)
    extended = client.videos.poll(extended.id, poll_interval_ms=100)
    assert extended.status == "completed", extended.error
    assert (extended.seconds, extended.model_extra["num_frames"]) == (f"{9 / 24:g}", 5)
    frames = serve.decode(client.videos.download_content(extended.id).content)
    assert frames.shape == (9, 64, 64, 3)
    # the head is the source (decoded, encoded again: H.264 moves it a little, not a lot)
    assert np.abs(frames[:5].astype(int) - source_frames.astype(int)).mean() < 8


def test_the_source_is_kept_with_the_job(server, source, serve):
    """The remix's source mp4 is copied with the job when it is submitted: deleting the source
    right away does not stop it; deleting the remix removes the copy."""
    client = server.client()
    throwaway = client.videos.create_and_poll(prompt="short-lived", poll_interval_ms=100, extra_body=STEPS)
    remix = client.videos.remix(throwaway.id, prompt="outlives its source", extra_body=STEPS)
    client.videos.delete(throwaway.id)
    kept = server.data_dir / "inputs" / f"{remix.id}.mp4"
    assert kept.is_file()
    assert client.videos.poll(remix.id, poll_interval_ms=100).status == "completed"
    client.videos.delete(remix.id)
    assert not kept.exists()


def test_bad_sources_are_400s_naming_video(server, source, serve):
    client = server.client(max_retries=0)

    def refused(status: int, message: str, param="video", **edit) -> None:
        with pytest.raises(openai.APIStatusError) as err:
            client.videos.edit(prompt="x", **edit)
        serve.assert_openai_error({"error": err.value.body}, status, err.value.status_code, message, param,
                                  err.value.body.get("code"))

    refused(400, "video: cannot decode the uploaded video", video=("clip.mp4", b"not a video", "video/mp4"))
    refused(400, "video: the uploaded video has more than 321 frames (the limit)",
            video=("long.mp4", mp4(322, 16, 16, rate=Fraction(48)), "video/mp4"))
    refused(400, "video: the video is 40 s long; this server takes at most 13.375 s",
            video=("slow.mp4", mp4(2, 16, 16, rate=Fraction(1, 20)), "video/mp4"))
    refused(413, "the request is larger than the 1 MB upload limit", param=None,
            video=("big.mp4", b"\0" * 2**21, "video/mp4"))
    url = server.url + "/v1/videos/edits"
    serve.expect_error(serve.http("POST", url, {"prompt": "x"}), 400,
                       "video: upload an mp4 or name a completed video", "video")
    serve.expect_error(serve.http("POST", url, {"prompt": "x", "video": {"id": "video_nope"}}), 404,
                       "no video with id 'video_nope'", code="not_found")
    running = client.videos.create(prompt="not done", extra_body={"num_inference_steps": 400})
    serve.expect_error(serve.http("POST", f"{server.url}/v1/videos/{running.id}/remix", {"prompt": "x"}), 409,
                       f"video {running.id} is ", code="video_not_ready")
    client.videos.delete(running.id)


def test_remix_and_extend_from_the_page(server, source, serve):
    """Headless Chromium: a finished video's Remix and Extend buttons queue new jobs that finish."""
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        browser.set_page_load_timeout(60)
        browser.get(server.url + "/")
        card = WebDriverWait(browser, 60).until(lambda b: b.find_element(
            By.CSS_SELECTOR, f'.job[data-id="{source.id}"] .followup').find_element(By.XPATH, ".."))
        for button, kind in (("remix", "remix"), ("extend", "extension")):
            card.find_element(By.CLASS_NAME, "next-prompt").clear()
            card.find_element(By.CLASS_NAME, "next-prompt").send_keys(f"from the page, {kind}")
            card.find_element(By.CLASS_NAME, button).click()
            done = WebDriverWait(browser, serve.JOB_TIMEOUT_S).until(lambda b: next(
                (c for c in b.find_elements(By.CSS_SELECTOR, ".job") if f"from the page, {kind}" in c.text
                 and c.find_element(By.CLASS_NAME, "status").text == "completed"), None))
            assert f"{kind} of {source.id}" in done.text
    finally:
        browser.quit()


def test_a_queued_edit_survives_kill9_and_restart(tmp_path, serve):
    """kill -9 of the service while an edit of an upload waits behind a long job: after a restart
    on the same data dir the edit runs from the upload kept with it."""
    data = tmp_path / "data"
    first = serve.Server(data).start()
    try:
        client = first.client()
        busy = client.videos.create(prompt="keeps the worker busy", extra_body={"num_inference_steps": 400})
        edit = client.videos.edit(prompt="from the kept upload", video=("clip.mp4", mp4(5, 32, 32), "video/mp4"),
                                  extra_body=STEPS)
        assert client.videos.retrieve(edit.id).status == "queued"
    finally:
        first.kill()
    second = serve.Server(data).start(wait_ready=False)
    try:
        client = second.client()
        client.videos.delete(busy.id)
        done = client.videos.poll(edit.id, poll_interval_ms=100)
        assert done.status == "completed", done.error
        assert serve.decode(client.videos.download_content(edit.id).content).shape == (5, 32, 32, 3)
    finally:
        second.kill()
