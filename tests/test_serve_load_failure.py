"""A service whose model cannot load stops trying, says why, and leaves no job waiting forever.

The worker's load is refused by the host-memory check ($WAN_RT_HOST_MEMORY_GB below what the
runtime alone needs), the way a real-size model is refused on a machine too small for it. A real
`wan-rt serve` on 127.0.0.1: a job submitted while the workers still try fails with the reason
once they give up (after MAX_LOAD_FAILURES tries), /readyz and /healthz answer 503 with it, and a
new job is refused with it. Bounded: every wait has a deadline, the server is killed in teardown.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from wan_rt.service.pool import MAX_LOAD_FAILURES

pytestmark = pytest.mark.slow
DEADLINE_S = 180


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def failing_server(tmp_path):
    env = {**os.environ, "WAN_RT_HOST_MEMORY_GB": "0.1"}
    code = "import sys; from wan_rt.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
                             "--log-level", "warning"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "serve.log", "ab"), text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and not (match := re.search(r"on (http://127\.0\.0\.1:\d+)", line)):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        assert match, "no listening line"
        yield match[1], proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_workers_that_cannot_load_give_up_and_say_why(failing_server):
    url, proc = failing_server
    status, job = _http("POST", url + "/v1/videos", {"prompt": "a fox", "seed": 1, "num_inference_steps": 1})
    assert status == 200, job
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        status, ready = _http("GET", url + "/readyz")
        if ready.get("error"):
            break
        assert status == 503  # never ready: the model cannot load
        time.sleep(0.5)
    assert status == 503 and "could not load the model" in ready["error"] and "WAN_RT_HOST_MEMORY_GB" not in ready["error"]
    assert "needs" in ready["error"] and f"{MAX_LOAD_FAILURES} tries" in ready["error"], ready["error"]
    assert [w["gave_up"] for w in ready["workers"]] == [ready["error"]]
    status, health = _http("GET", url + "/healthz")
    assert status == 503 and health == {"status": "failed", "error": ready["error"]}

    status, failed = _http("GET", f"{url}/v1/videos/{job['id']}")
    assert status == 200 and failed["status"] == "failed", failed
    assert failed["error"]["code"] == "model_load_failed" and "needs" in failed["error"]["message"]

    status, refused = _http("POST", url + "/v1/videos", {"prompt": "another", "num_inference_steps": 1})
    assert status == 503 and refused["error"]["code"] == "model_load_failed", refused
    time.sleep(2)  # no more restarts: the same worker record, nothing loading
    status, again = _http("GET", url + "/readyz")
    assert again["workers"][0]["restarts"] == ready["workers"][0]["restarts"] and again["workers"][0]["pid"] is None
    assert proc.poll() is None  # the API stays up
