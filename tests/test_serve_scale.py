"""wan-rt serve past one machine: videos in an S3-compatible bucket (moto's S3 server on
127.0.0.1), two services on one PostgreSQL queue (the private server of conftest.py) serving each
other's videos, kill -9 of a service mid-job, and the SIGTERM drain.

Every server runs in its own process group and is killed in teardown; every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from wan_rt.service.storage import LocalStorage, S3Storage  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "tiny-ti2v-5B"          # text or a first frame: uploads are stored too
BUCKET, PREFIX = "wan-rt-videos", "scale/test"
LEASE_S = 4.0                   # a killed service's job goes to the other one this soon
DRAIN_S = 60.0                  # a running job may finish while its service drains
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # moto's
TIMEOUT_S = 150


# ----------------------------------------------------------------------------- the bucket
@pytest.fixture(scope="module")
def s3(local_services):
    """moto's S3 server on a free loopback port, with the bucket; -> (endpoint URL, boto3 client).
    Its credentials are set in this process while the module runs (the services get them too)."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in AWS.items():
            env.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        with local_services.moto_s3(BUCKET) as endpoint:
            yield endpoint, boto3.client("s3", endpoint_url=endpoint)


def _keys(client, part: str = "") -> list[str]:
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "/")
    return sorted(o["Key"] for o in listed.get("Contents", []) if part in o["Key"])


# ----------------------------------------------------------------------------- the storage interface
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_storage_put_read_download_delete(kind, tmp_path, request):
    if kind == "local":
        storage = LocalStorage(tmp_path / "data")
    else:
        endpoint, _ = request.getfixturevalue("s3")
        storage = S3Storage(BUCKET, PREFIX + "/unit", endpoint)
    storage.check()
    storage.put_bytes("videos/a.webp", b"thumbnail", "image/webp")
    source = tmp_path / "a.mp4"
    source.write_bytes(b"mp4 bytes")
    storage.put_file("videos/a.mp4", source, "video/mp4")
    assert not source.exists(), "a stored file is moved or uploaded, not copied"
    assert storage.read("videos/a.webp") == b"thumbnail"
    got = storage.download("videos/a.mp4")
    body = got.path.read_bytes() if got.path is not None else b"".join(got.chunks)
    assert body == b"mp4 bytes" and got.url is None
    storage.delete(["videos/a.mp4", "videos/a.webp", "videos/never-written.jpg"])
    assert storage.download("videos/a.mp4") is None
    with pytest.raises(FileNotFoundError):
        storage.read("videos/a.webp")


def test_s3_storage_uploads_large_files_in_parts_and_presigns(s3, tmp_path):
    endpoint, client = s3
    storage = S3Storage(BUCKET, PREFIX + "/big", endpoint, presign=True, multipart_bytes=5 * 2**20)
    data = os.urandom(6 * 2**20)  # over the threshold: two parts (S3's smallest part is 5 MiB)
    source = tmp_path / "big.mp4"
    source.write_bytes(data)
    storage.put_file("videos/big.mp4", source, "video/mp4")
    head = client.head_object(Bucket=BUCKET, Key=f"{PREFIX}/big/videos/big.mp4")
    assert head["ETag"].strip('"').endswith("-2"), f"not a multipart upload: {head['ETag']}"
    assert head["ContentType"] == "video/mp4"
    url = storage.download("videos/big.mp4").url
    assert url.startswith(endpoint) and "Signature" in url
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.read() == data
    assert storage.download("videos/missing.mp4") is None
    storage.delete(["videos/big.mp4"])


def test_serve_refuses_bad_storage_in_one_line(s3, tmp_path, capsys):
    from wan_rt.cli import main

    endpoint, _ = s3
    cases = [
        (["--presign"], "--presign needs --storage s3://bucket/prefix"),
        (["--storage", "gs://bucket/x"], "--storage: storage must be s3://bucket/prefix (GCS, R2, MinIO: through "
                                         "their S3 APIs); got 'gs://bucket/x'"),
        (["--storage", "s3:///x"], "--storage: storage 's3:///x' names no bucket: s3://bucket/prefix"),
        (["--storage", "s3://no-such-bucket/x", "--s3-endpoint-url", endpoint],
         "cannot reach s3://no-such-bucket: 404: Not Found"),
    ]
    for args, message in cases:
        assert main(["serve", "--port", "0", "--data-dir", str(tmp_path / "data"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"wan-rt serve: error: {message}", err


# ----------------------------------------------------------------------------- two services, one queue
class Service:
    """`wan-rt serve` on the shared PostgreSQL store and bucket, in its own process group."""

    def __init__(self, root: Path, name: str, store: str, endpoint: str, *extra: str):
        self.data = root / name
        self.log = root / f"{name}.log"
        self.args = ["serve", "--model", MODEL, "--port", "0", "--data-dir", str(self.data), "--log-level",
                     "warning", "--store", store, "--storage", f"s3://{BUCKET}/{PREFIX}", "--s3-endpoint-url",
                     endpoint, "--lease-timeout", str(LEASE_S), "--drain-timeout", str(DRAIN_S), *extra]
        code = "import sys; from wan_rt.cli import main; sys.exit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen([sys.executable, "-c", code, *self.args], cwd=root, env={**os.environ, **AWS},
                                     stdout=subprocess.PIPE, stderr=open(self.log, "ab"), text=True,
                                     start_new_session=True)
        self.url = ""

    def listening(self) -> "Service":
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", line[0] if line else "")
        assert match, f"no listening line: {line}\n{self.log.read_text()[-3000:]}"
        self.url = match[1]
        return self

    def ready(self) -> "Service":
        _wait(lambda: self.get("/readyz")[0] == 200 or self.proc.poll() is not None, "ready")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return self

    def get(self, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
        return _http(method, self.url + path, body, headers)

    def submit(self, prompt: str, steps: int, image: bytes | None = None) -> str:
        fields = {"prompt": prompt, "num_inference_steps": steps, "seed": 7}
        if image is not None:
            import base64

            fields["input_reference"] = {"image_url": "data:image/png;base64," + base64.b64encode(image).decode()}
        status, _, video = self.get("/v1/videos", "POST", json.dumps(fields).encode(),
                                    {"Content-Type": "application/json"})
        assert status == 200, video
        return video["id"]

    def video(self, video_id: str) -> dict:
        status, _, video = self.get(f"/v1/videos/{video_id}")
        assert status == 200, video
        return video

    def wait(self, video_id: str) -> dict:
        return _wait(lambda: (v := self.video(video_id))["status"] in ("completed", "failed") and v, video_id)

    def running(self) -> set[str]:
        if not self.url:
            return set()
        status, _, body = self.get("/readyz")
        return {w["job"] for w in body["workers"] if w["job"]}

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """-> (status, headers, JSON or bytes); errors are returned, redirects are not followed."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=30) as response:
            status, head, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        status, head, raw = err.code, dict(err.headers), err.read()
    if head.get("content-type", "").startswith("application/json"):
        return status, head, json.loads(raw)
    return status, head, raw


def _wait(predicate, what: str, timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 60, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pair(s3, postgres_url, local_services, tmp_path_factory):
    """Services A (streams content) and B (redirects to presigned URLs): one queue, one bucket,
    their own data dirs; a test that stops one removes it from the dict."""
    store = local_services.new_database(postgres_url, "wan_rt_scale")
    endpoint, client = s3
    root = tmp_path_factory.mktemp("scale")
    started: list[Service] = []

    class Pair(dict):
        def start(self, name: str, *extra: str) -> Service:
            service = Service(root, f"{name}{len(started)}", store, endpoint, *extra)
            started.append(service)
            self[name] = service
            return service

    services = Pair()
    try:
        services.start("A"), services.start("B", "--presign")   # both load at once
        for service in services.values():
            service.listening().ready()
        services.client, services.store = client, store
        yield services
    finally:
        for service in started:
            service.kill()


def _runner(pair, video_id: str) -> "Service":
    """The service whose worker runs the job now."""
    return _wait(lambda: next((s for s in pair.values() if video_id in s.running()), None), f"{video_id} to run")


def test_two_services_serve_each_others_videos(pair):
    a, b = pair["A"], pair["B"]
    with_image, text_only = a.submit("a red square", 3, _png()), a.submit("a fox", 3)
    assert pair.client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/inputs/{with_image}.png")["ContentType"] == "image/png"
    # Progress from the other service, as server-sent events, until the job is done.
    status, _, stream = b.get(f"/v1/videos/{with_image}/events")
    events = [json.loads(line[6:]) for line in stream.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1]["status"] == "completed" and events[-1]["progress"] == 100
    for video_id in (with_image, text_only):
        done = b.wait(video_id)
        assert done["status"] == "completed" and done["attempts"] == 1, done
        assert a.video(video_id) == b.video(video_id)
        for variant in ("video", "thumbnail", "spritesheet"):
            key = f"{PREFIX}/videos/{video_id}" + {"video": ".mp4", "thumbnail": ".webp", "spritesheet": ".jpg"}[variant]
            stored = pair.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            status, head, streamed = a.get(f"/v1/videos/{video_id}/content?variant={variant}")
            assert status == 200 and streamed == stored and int(head["content-length"]) == len(stored)
            status, head, _ = b.get(f"/v1/videos/{video_id}/content?variant={variant}")
            assert status == 307, "B redirects to the bucket"
            with urllib.request.urlopen(head["location"], timeout=30) as response:
                assert response.read() == stored
    assert a.get(f"/v1/videos/{text_only}/content")[2][4:8] == b"ftyp"
    for service in (a, b):  # the outputs live in the bucket, not in a data dir
        assert not any((service.data / "videos").iterdir()) and not any((service.data / "scratch").iterdir())
    # Delete on B: gone from the queue and from the bucket, for both services.
    status, _, body = b.get(f"/v1/videos/{with_image}", "DELETE")
    assert status == 200 and body["deleted"]
    assert a.get(f"/v1/videos/{with_image}")[0] == 404 and a.get(f"/v1/videos/{with_image}/content")[0] == 404
    assert _keys(pair.client, with_image) == []
    assert len(_keys(pair.client, text_only)) == 3
    # Retention: once a video expires, a service's housekeeping (about once a second) removes its objects.
    from wan_rt.service.stores import open_store

    store = open_store(pair.store)
    try:
        store._run("UPDATE wan_rt_jobs SET expires_at = ? WHERE id = ?", (time.time() - 1, text_only))
    finally:
        store.close()
    _wait(lambda: a.video(text_only)["status"] == "completed" and not _keys(pair.client, text_only), "expiry",
          timeout=30)
    status, _, body = b.get(f"/v1/videos/{text_only}/content")
    assert status == 404 and body["error"]["code"] == "video_expired", body


def test_a_bucket_that_refuses_writes_fails_the_job_and_the_service_goes_on(pair):
    deny = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                                                    "Resource": f"arn:aws:s3:::{BUCKET}/*"}]}
    pair.client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(deny))
    try:
        refused = pair["A"].submit("nowhere to go", 2)
        failed = pair["B"].wait(refused)
    finally:
        pair.client.delete_bucket_policy(Bucket=BUCKET)
    assert failed["status"] == "failed" and failed["error"]["code"] == "storage_failed", failed
    assert re.match(rf"cannot write s3://{BUCKET}/{PREFIX}/videos/{refused}\.webp: ", failed["error"]["message"])
    assert "\n" not in failed["error"]["message"] and _keys(pair.client, refused) == []
    assert all(s.get("/readyz")[0] == 200 for s in pair.values()), "both services stay up"
    after = pair["B"].submit("the bucket takes writes again", 2)
    assert pair["A"].wait(after)["status"] == "completed"


def test_kill_9_mid_job_the_other_service_finishes_it_once(pair):
    video_id = pair["A"].submit("survives its service", 60)
    victim = _runner(pair, video_id)
    survivor = next(s for s in pair.values() if s is not victim)
    _wait(lambda: victim.video(video_id)["progress"] > 0, "progress")
    victim.kill(signal.SIGKILL)   # the service and its worker, as a machine that dies
    del pair[next(name for name, s in pair.items() if s is victim)]
    done = survivor.wait(video_id)
    assert done["status"] == "completed" and done["attempts"] == 2, done
    assert "lease" in done["last_error"], done
    assert survivor.get(f"/v1/videos/{video_id}/content")[0] in (200, 307)


def test_sigterm_and_sigint_drain(pair):
    """SIGTERM: /readyz 503 at once, the running job finishes, exit 0. SIGINT past the drain
    timeout: the job goes back to the queue without being charged an attempt, exit 0."""
    from wan_rt.service.stores import open_store

    if not pair:
        pair.start("A").listening().ready()
    (alone,) = pair.values()
    patient = pair.start("R", "--drain-timeout", "1")   # loads meanwhile: it claims nothing yet
    video_id = alone.submit("finishes while its service drains", 50)
    assert _runner(pair, video_id) is alone
    alone.proc.send_signal(signal.SIGTERM)   # the service alone: its workers are its to stop
    status, _, body = _wait(lambda: (r := alone.get("/readyz"))[0] == 503 and r, "readyz 503", timeout=2)
    assert body["draining"] and not body["ready"]
    assert alone.video(video_id)["status"] in ("in_progress", "completed"), "the API answers while it drains"
    assert alone.proc.wait(DRAIN_S + 30) == 0, alone.log.read_text()[-2000:]

    patient.listening().ready()
    done = patient.video(video_id)
    assert done["status"] == "completed" and done["attempts"] == 1, done
    long_id = patient.submit("longer than the drain", 1000)
    _wait(lambda: long_id in patient.running(), "the long job to run")
    patient.proc.send_signal(signal.SIGINT)
    assert patient.proc.wait(30) == 0, patient.log.read_text()[-2000:]
    store = open_store(pair.store)
    try:
        back = store.get(long_id)
        assert back.status == "queued" and back.attempts == 0 and back.last_error == "the service stopped", back
        store.delete(long_id)
    finally:
        store.close()
