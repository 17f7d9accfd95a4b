"""`wan-rt serve` under load: API latency while a job runs, and jobs per minute on the tiny model.

Reference measured in the same run: the same jobs on a warm pipeline called in a loop in this
process (no server, no store; the mp4 is written the same way), so "vs pipeline" is what the
queue, the store, the worker processes and HTTP cost or gain. Latency: GET /v1/videos/{id} on
one keep-alive connection, idle and while a long job runs, p50/p99.

    python bench/serve.py --json bench/serve.json                      # 1 and 2 CPU workers
    python bench/serve.py --jobs 2 --requests 20 --devices cpu         # smoke test (CI)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_json  # noqa: E402

MODEL = "tiny-t2v-A14B"
JOB = {"num_inference_steps": 4, "num_frames": 5, "size": "32x32"}   # the tiny model's defaults, spelled out
LONG_JOB = {"num_inference_steps": 5000, "num_frames": 5, "size": "32x32"}  # runs until deleted


class Api:
    """One keep-alive HTTP connection to a server."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        payload = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if body else {})
        response = self.conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data.startswith(b"{") else {}

    def wait(self, video_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, video = self.call("GET", f"/v1/videos/{video_id}")
            if video["status"] in ("completed", "failed"):
                return video
            time.sleep(0.02)
        raise TimeoutError(f"{video_id} not finished after {timeout} s")


def serve(devices: str, data_dir: Path) -> tuple[subprocess.Popen, int]:
    code = "import sys; from wan_rt.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--port", "0", "--devices", devices,
                             "--data-dir", str(data_dir), "--log-level", "warning", "--model", MODEL],
                            stdout=subprocess.PIPE, text=True, cwd=data_dir.parent, start_new_session=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not found:
        proc.kill()
        raise RuntimeError(f"wan-rt serve did not start: {line!r}")
    port = int(found[1])
    api = Api(port)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status, ready = api.call("GET", "/readyz")
        if status == 200 and all(w["ready"] for w in ready["workers"]):
            return proc, port
        time.sleep(0.2)
    raise RuntimeError("workers not ready after 300 s")


def latencies_ms(api: Api, video_id: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        api.call("GET", f"/v1/videos/{video_id}")
        out.append((time.perf_counter() - start) * 1000)
    return out


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def bench_server(devices: str, jobs: int, requests: int, work: Path) -> dict:
    proc, port = serve(devices, work / f"data-{devices.replace(',', '-')}")
    try:
        api = Api(port)
        _, warm = api.call("POST", "/v1/videos", {"prompt": "warm-up", **JOB})
        api.wait(warm["id"])
        idle = latencies_ms(api, warm["id"], requests)
        _, long = api.call("POST", "/v1/videos", {"prompt": "keeps a worker busy", **LONG_JOB})
        while api.call("GET", f"/v1/videos/{long['id']}")[1]["status"] != "in_progress":
            time.sleep(0.05)
        busy = latencies_ms(api, long["id"], requests)
        api.call("DELETE", f"/v1/videos/{long['id']}")
        start = time.perf_counter()
        ids = [api.call("POST", "/v1/videos", {"prompt": f"job {i}", "seed": i, **JOB})[1]["id"] for i in range(jobs)]
        results = [api.wait(i) for i in ids]
        seconds = time.perf_counter() - start
        assert all(r["status"] == "completed" for r in results), [r["error"] for r in results]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    workers = len(devices.split(","))
    return {"variant": f"wan-rt serve, {workers} CPU worker{'s' if workers > 1 else ''}", "devices": devices,
            "jobs": jobs, "seconds": seconds, "jobs_per_min": 60 * jobs / seconds,
            "get_idle_p50_ms": p(idle, 50), "get_idle_p99_ms": p(idle, 99),
            "get_busy_p50_ms": p(busy, 50), "get_busy_p99_ms": p(busy, 99)}


def bench_pipeline(jobs: int, work: Path) -> dict:
    """The reference: a warm pipeline in this process, the same jobs one after another."""
    import torch

    import wan_rt

    pipe = wan_rt.WanPipeline.from_pretrained(MODEL, device="cpu")
    pipe.set_progress_bar_config(disable=True)

    def one(seed: int) -> None:
        out = pipe("job", height=32, width=32, num_frames=5, num_inference_steps=4,
                   generator=torch.Generator("cpu").manual_seed(seed))
        wan_rt.export_to_video(out.frames[0], work / "ref.mp4", fps=pipe.spec.fps)

    one(0)  # warm-up
    start = time.perf_counter()
    for seed in range(jobs):
        one(seed)
    seconds = time.perf_counter() - start
    return {"variant": "warm pipeline in-process (reference)", "devices": "cpu", "jobs": jobs, "seconds": seconds,
            "jobs_per_min": 60 * jobs / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs per variant (tiny default: 32x32x5, 4 steps)")
    parser.add_argument("--requests", type=int, default=300, help="GETs per latency measurement")
    parser.add_argument("--devices", action="append", default=None,
                        help="a server variant's --devices (repeatable; default: cpu and cpu,cpu)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="wan_rt_bench_serve_"))
    rows = [bench_pipeline(args.jobs, work)]
    for devices in args.devices or ["cpu", "cpu,cpu"]:
        rows.append(bench_server(devices, args.jobs, args.requests, work))
    for row in rows:
        row["vs_pipeline"] = row["jobs_per_min"] / rows[0]["jobs_per_min"]
    print_table(rows, ["variant", "jobs", "seconds", "jobs_per_min", "vs_pipeline", "get_idle_p50_ms",
                       "get_idle_p99_ms", "get_busy_p50_ms", "get_busy_p99_ms"])
    write_json(args.json, {"environment": environment(), "model": MODEL, "job": JOB, "requests": args.requests,
                           "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
