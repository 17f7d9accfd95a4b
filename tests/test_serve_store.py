"""wan-rt serve below HTTP: the job store (SQLite and a real PostgreSQL server started here), the
worker's handling of a failed generation, and the in-process VideoService with worker processes."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import pytest
import torch

from wan_rt.service import InvalidRequest, JobNotFound, QueueFull, VideoExpired, VideoRequest, VideoService
from wan_rt.service.jobs import Job, JobError, new_job_id
from wan_rt.service.outputs import JobFiles
from wan_rt.service.stores import open_store
from wan_rt.service.workers import WorkerSettings, run_job

MODEL = "tiny-t2v-A14B"


def _fresh_postgres(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS wan_rt_jobs")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "jobs.sqlite")
    url = request.getfixturevalue("postgres_url")
    _fresh_postgres(url)
    return url


def _job(prompt: str = "a fox", model: str = MODEL, **request) -> Job:
    request.setdefault("seed", 0)
    return Job(id=new_job_id(), model=model, request=VideoRequest(prompt, **request), created_at=time.time())


# ----------------------------------------------------------------------------- the store
def test_store_queue_order_claim_and_complete(store_url):
    store = open_store(store_url)
    jobs = [store.add(_job(f"p{i}")) for i in range(3)]
    store.add(_job("other model", model="tiny-i2v-A14B"))
    claimed = store.claim(MODEL, "w1", time.time())
    assert claimed is not None and claimed.id == jobs[0].id and claimed.status == "in_progress"
    assert claimed.attempts == 1 and claimed.worker_id == "w1"
    store.set_progress(claimed.id, "w1", 40)
    assert store.get(claimed.id).progress == 40
    assert not store.complete(claimed.id, "w2", time.time(), None, {}), "only the owner completes a job"
    assert store.complete(claimed.id, "w1", time.time(), time.time() + 60, {"vae_decoder": 0.5})
    done = store.get(claimed.id)
    assert done.status == "completed" and done.progress == 100 and done.timings == {"vae_decoder": 0.5}
    assert [store.claim(MODEL, "w1", time.time()).id for _ in range(2)] == [j.id for j in jobs[1:]]
    assert store.claim(MODEL, "w1", time.time()) is None, "the other model's job is not ours"
    assert store.counts() == {"queued": 1, "in_progress": 2, "completed": 1, "failed": 0}
    store.close()


def test_store_max_queue(store_url):
    store = open_store(store_url)
    store.add(_job(), max_queued=2)
    store.add(_job(), max_queued=2)
    with pytest.raises(QueueFull):
        store.add(_job(), max_queued=2)
    store.claim(MODEL, "w", time.time())  # a running job frees its queue slot
    store.add(_job(), max_queued=2)
    assert store.counts()["queued"] == 2
    store.close()


def test_store_pages_like_the_openai_client(store_url):
    store = open_store(store_url)
    ids = [store.add(_job(f"p{i}")).id for i in range(5)]
    page, more = store.page(limit=2, order="desc")
    assert [j.id for j in page] == ids[:-3:-1] and more
    page, more = store.page(after=page[-1].id, limit=2, order="desc")
    assert [j.id for j in page] == [ids[2], ids[1]] and more
    page, more = store.page(after=page[-1].id, limit=2, order="desc")
    assert [j.id for j in page] == [ids[0]] and not more
    page, more = store.page(after=ids[1], limit=10, order="asc")
    assert [j.id for j in page] == ids[2:] and not more
    with pytest.raises(JobNotFound):
        store.page(after="video_nope")
    store.close()


def test_store_cancel_delete_and_lease(store_url):
    store = open_store(store_url)
    running, queued = store.add(_job("run")), store.add(_job("wait"))
    store.claim(MODEL, "w1", time.time())
    assert store.heartbeat(running.id, "w1", time.time())
    assert store.cancel(queued.id, time.time()).error == JobError("cancelled", "cancelled by request")
    flagged = store.cancel(running.id, time.time())
    assert flagged.status == "in_progress" and flagged.cancel_requested
    assert not store.heartbeat(running.id, "w1", time.time()), "the worker learns of the cancel from its lease"
    assert store.fail(running.id, "w1", JobError("cancelled", "cancelled by request"), time.time())
    other = store.add(_job("deleted while running"))
    store.claim(MODEL, "w2", time.time())
    assert store.delete(other.id).id == other.id
    assert store.get(other.id) is None and not store.heartbeat(other.id, "w2", time.time())
    with pytest.raises(JobNotFound):
        store.delete(other.id)
    store.close()


def test_store_release_requeues_in_place_then_fails(store_url):
    store = open_store(store_url)
    first, second = store.add(_job("first")), store.add(_job("second"))
    for attempt in (1, 2):
        assert store.claim(MODEL, "w", time.time()).id == first.id, "a re-queued job keeps its place"
        released = store.release("the worker was killed by signal 9", 2, time.time(), worker_id="w")
        assert [j.id for j in released] == [first.id]
    again = store.get(first.id)
    assert again.status == "failed" and again.attempts == 2
    assert again.error == JobError("worker_crashed", "the worker was killed by signal 9 (attempt 2 of 2)")
    assert store.claim(MODEL, "w", time.time()).id == second.id
    # A stale lease (a worker on another machine that vanished) is handed back; an orderly
    # shutdown (charge=False) does not use up an attempt.
    assert store.release("stale", 3, time.time(), stale_before=time.time() - 60) == []
    released = store.release("stale", 3, time.time(), stale_before=time.time() + 1)
    assert [j.id for j in released] == [second.id] and released[0].status == "queued"
    store.claim(MODEL, "w", time.time())
    store.release("the service stopped", 1, time.time(), worker_id="w", charge=False)
    assert store.get(second.id).status == "queued" and store.get(second.id).attempts == 1
    store.close()


def test_store_concurrent_claims_hand_out_each_job_once(store_url):
    """Four workers, each with its own connection, race for 40 jobs: every job is claimed once."""
    setup = open_store(store_url)
    ids = {setup.add(_job(f"p{i}")).id for i in range(40)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        store = open_store(store_url)
        while (job := store.claim(MODEL, name, time.time())) is not None:
            with lock:
                claimed.append(job.id)
        store.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(claimed) == sorted(ids)
    setup.close()


def test_postgres_store_refuses_a_dead_server_in_one_line(tmp_path):
    pytest.importorskip("psycopg")
    with pytest.raises(ConnectionError, match=r"^cannot connect to the job store postgresql://u:\*\*\*@") as err:
        open_store(f"postgresql://u:secret@/db?host={tmp_path}&port=1")
    assert "secret" not in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- a worker's failures
class _FailingPipe:
    """Stands in for a pipeline whose generation raises `exc` (a real OOM needs a GPU)."""

    def __init__(self, exc: BaseException):
        self.exc, self.interrupt, self.device = exc, False, torch.device("cpu")

    def __call__(self, *args, **kwargs):
        raise self.exc


@pytest.mark.parametrize("exc, status, code", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "queued", None),
    (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), "failed", "generation_failed"),
    (ValueError("image array must be [H, W, 3]"), "failed", "invalid_request"),
])
def test_worker_classifies_a_failed_generation(tmp_path, exc, status, code):
    """Out of memory: retried (the worker then restarts for a fresh CUDA context); another
    exception fails the job with its reason, and the worker carries on."""
    store = open_store(str(tmp_path / "jobs.sqlite"))
    job = store.add(_job())
    claimed = store.claim(MODEL, "w", time.time())
    settings = WorkerSettings(served=None, store_url="", data_dir=str(tmp_path), max_attempts=3)  # type: ignore[arg-type]
    report = run_job(_FailingPipe(exc), claimed, store, JobFiles(tmp_path), "w", settings)
    after = store.get(job.id)
    assert after.status == status
    assert report["outcome"] == {"queued": "out_of_memory", "failed": "failed"}[status]
    if code is None:
        assert after.last_error.startswith("out of memory on cpu: OutOfMemoryError: CUDA out of memory")
    else:
        assert after.error.code == code and after.error.message == f"{type(exc).__name__}: {exc}"
    store.close()


# ----------------------------------------------------------------------------- the in-process API
@pytest.fixture(scope="module")
def i2v_service(tmp_path_factory):
    """One worker process with a warm tiny I2V pipeline (image-to-video: uploads are exercised)."""
    with VideoService("tiny-i2v-A14B", devices=["cpu"], data_dir=tmp_path_factory.mktemp("svc"),
                      retention_s=None) as service:
        deadline = time.monotonic() + 120
        while not service.ready:
            assert time.monotonic() < deadline, f"worker not ready: {service.workers()}"
            time.sleep(0.2)
        yield service


def _png(color=(200, 30, 30), size=(48, 40)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_service_submit_events_and_wait(i2v_service):
    job = i2v_service.submit(VideoRequest("a fox", num_inference_steps=30, seed=3), image=_png())
    assert job.request.height == 32 and job.request.num_frames == 5, "the model's defaults are filled in"
    seen = list(i2v_service.events(job.id, timeout=120))
    assert seen[-1].status == "completed" and seen[-1].progress == 100
    progress = [s.progress for s in seen]
    assert progress == sorted(progress) and any(0 < p < 100 for p in progress), progress
    assert i2v_service.wait(job.id, timeout=5).status == "completed"
    path = i2v_service.content_path(job.id)
    assert path.suffix == ".mp4" and path.stat().st_size > 0
    assert i2v_service.content_path(job.id, "thumbnail").read_bytes()[8:12] == b"WEBP"


def test_service_from_asyncio(i2v_service):
    async def main():
        job = await asyncio.to_thread(i2v_service.submit, VideoRequest("a cat", seed=4), _png((0, 90, 200)))
        progress = [s.progress async for s in i2v_service.events_async(job.id, timeout=120)]
        return await i2v_service.wait_async(job.id, timeout=5), progress

    done, progress = asyncio.run(main())
    assert done.status == "completed" and progress[-1] == 100


def test_service_refuses_bad_requests_in_one_line(i2v_service):
    cases = [
        (VideoRequest("x", num_frames=6), _png(), "num_frames must be 4k+1 (1, 5, 9, ..., 81); got 6"),
        (VideoRequest("x", height=30), _png(), "width and height must be positive multiples of 16"),
        (VideoRequest("x", num_inference_steps=0), _png(), "num_inference_steps must be >= 1; got 0"),
        (VideoRequest("x"), None, "tiny-i2v-A14B is an image-to-video model: pass input_reference"),
        (VideoRequest("x"), b"not an image", "input_reference is not an image"),
        (VideoRequest(""), _png(), "prompt must be a non-empty string"),
        (VideoRequest("x", solver="ddim"), _png(), "solver must be one of unipc, dpm++, euler; got 'ddim'"),
    ]
    before, uploads = i2v_service.store.counts(), sorted(os.listdir(i2v_service.files.inputs))
    for request, image, message in cases:
        with pytest.raises(InvalidRequest) as err:
            i2v_service.submit(request, image)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert i2v_service.store.counts() == before, "a refused request leaves no job"
    assert sorted(os.listdir(i2v_service.files.inputs)) == uploads, "nor an uploaded file"


def test_service_cancel_queued_and_running_and_survive_a_failure(i2v_service):
    long = i2v_service.submit(VideoRequest("long", num_inference_steps=200, seed=1), _png())
    broken = i2v_service.submit(VideoRequest("its image vanishes", seed=2), _png())
    waiting = i2v_service.submit(VideoRequest("cancelled while queued", seed=3), _png())
    i2v_service.files.input_image(broken.id).unlink()   # a generation that raises in the worker
    cancelled = i2v_service.cancel(waiting.id)
    assert cancelled.status == "failed" and cancelled.error.code == "cancelled"
    for snapshot in i2v_service.events(long.id, timeout=120):
        if snapshot.progress > 0:
            break
    i2v_service.cancel(long.id)
    stopped = i2v_service.wait(long.id, timeout=60)
    assert stopped.status == "failed" and stopped.error.code == "cancelled" and stopped.progress < 100
    failed = i2v_service.wait(broken.id, timeout=60)
    assert failed.status == "failed" and failed.error.code == "generation_failed"
    assert failed.error.message.startswith("FileNotFoundError: image not found")
    after = i2v_service.submit(VideoRequest("the worker carries on", seed=5), _png())
    assert i2v_service.wait(after.id, timeout=120).status == "completed"
    assert all(w["restarts"] == 0 for w in i2v_service.workers())


def test_service_retention_removes_expired_outputs(i2v_service):
    job = i2v_service.submit(VideoRequest("short lived", seed=6), _png())
    i2v_service.wait(job.id, timeout=120)
    assert i2v_service.content_path(job.id).is_file()
    i2v_service.store._run("UPDATE wan_rt_jobs SET expires_at = ? WHERE id = ?", (time.time() - 1, job.id))
    deadline = time.monotonic() + 10
    while not i2v_service.get(job.id).expired:   # the pool's housekeeping runs about once a second
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with pytest.raises(VideoExpired):
        i2v_service.content_path(job.id)
    assert not i2v_service.files.output(job.id).exists() and not i2v_service.files.input_image(job.id).exists()


def test_two_services_share_one_postgres_queue(postgres_url, tmp_path):
    """Two services (as on two machines) on one PostgreSQL queue and one shared data dir: every
    job runs exactly once, whichever service's worker takes it."""
    _fresh_postgres(postgres_url)
    common = dict(devices=["cpu"], data_dir=tmp_path, store=postgres_url, retention_s=None)
    with VideoService(MODEL, **common) as first, VideoService(MODEL, **common) as second:
        jobs = [first.submit(VideoRequest(f"p{i}", num_inference_steps=2, seed=i)) for i in range(4)]
        done = [second.wait(job.id, timeout=180) for job in jobs]
    assert [j.status for j in done] == ["completed"] * 4 and all(j.attempts == 1 for j in done)
    assert all((tmp_path / "videos" / f"{j.id}.mp4").is_file() for j in done)
