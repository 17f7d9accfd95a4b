"""The HTTP layer: OpenAI's Videos API, progress as server-sent events, health, metrics and the
web page, on a VideoService. `create_app(service)` -> a FastAPI app; `wan-rt serve` runs it.

The official `openai` client works unchanged (`client.videos.create_and_poll(...)`, `retrieve`,
`download_content`, `list`, `delete`, `remix`, `edit`, `extend`); wan_rt's own fields go in
`extra_body`. Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}.
/openapi.json describes every body and answer (api_models.py, openapi.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from importlib import resources
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from wan_rt.pipeline import check_extendable
from wan_rt.service import openapi
from wan_rt.service.api_models import (ErrorResponse, Health, Model, ModelList, Order, Ready, Variant, Video,
                                       VideoDeleted, VideoList, request_models)
from wan_rt.service.http_bodies import APIError, Body, data_url_bytes, read_body
from wan_rt.service.jobs import InvalidRequest, Job, JobNotFound, ModelUnavailable, QueueFull, VideoRequest
from wan_rt.service.outputs import VARIANTS
from wan_rt.service.service import VideoExpired, VideoNotReady, VideoService
from wan_rt.service.storage import StorageError

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
POLL_AFTER_MS = 250        # what the openai client's poll() waits between retrieves (openai-poll-after-ms)
KEEPALIVE_S = 15.0         # an SSE comment this often keeps proxies from closing a quiet stream
WHY = {400: "a request this server refuses (the message names the field)", 401: "no or a wrong API key",
       404: "no such video (or model), or its files expired", 409: "the video is not completed (yet, or ever)",
       413: "the body is larger than the upload limit", 429: "the queue is full; retry after Retry-After seconds",
       503: "no worker has loaded the model (yet, or it cannot load here), or the storage failed"}
SUBMIT_ERRORS = (400, 413, 429, 503)
# One server-sent event (OpenAPI 3.1: the schema of a text/event-stream is each event's): its data
# is a Video object as JSON, or an error once the video is deleted.
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"}, "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "anyOf": [{"$ref": "#/components/schemas/Video"}, {"$ref": "#/components/schemas/ErrorResponse"}]}}}}


def create_app(service: VideoService, api_key: Optional[str] = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """api_key: when set, /v1/* and /metrics need `Authorization: Bearer <key>` (compared in
    constant time); the page, /healthz and /readyz stay open (the page asks for the key)."""
    app = FastAPI(title="wan_rt", summary="OpenAI-compatible video generation", docs_url="/docs")
    started = int(time.time())
    models = request_models(service.model)
    keyed = (401,) if api_key is not None else ()
    _install_error_handlers(app)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    def errors(*statuses: int) -> dict:
        return {status: {"model": ErrorResponse, "description": WHY[status]} for status in (*statuses, *keyed)}

    async def body_of(request: Request, model) -> Body:
        return await read_body(request, model, service.model, max_upload_bytes)

    async def submit(request: VideoRequest, image: Optional[bytes] = None, video: Optional[bytes] = None):
        return _video_response(await _call(service.submit, request, image, video), service)

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
    created = dict(response_model=Video, responses=errors(*SUBMIT_ERRORS))
    from_video = dict(response_model=Video, responses=errors(*SUBMIT_ERRORS, 404, 409))

    @api.post("/videos", operation_id="create_video", **created)
    async def create_video(request: Request) -> JSONResponse:
        """A video from a prompt (and a first frame: input_reference, on image-to-video models).
        Multipart form (as the openai client sends it) or JSON; wan_rt's fields beside OpenAI's."""
        body = await body_of(request, models.create)
        fields = body.given()
        reference = fields.pop("input_reference", None)
        image = body.files.get("input_reference") or (
            data_url_bytes(reference["image_url"], "input_reference") if reference else None)
        return await submit(VideoRequest(**_request_fields(fields, service)), image)

    @api.post("/videos/{video_id}/remix", operation_id="remix_video", **from_video)
    async def remix_video(video_id: str, request: Request) -> JSONResponse:
        """The completed video again with a new prompt: video-to-video of its frames, its settings
        unless given here (`strength`: how far the remix may move from it)."""
        fields = (await body_of(request, models.remix)).given()
        return _video_response(await _call(service.remix, video_id, _request_fields(fields, service)), service)

    @api.post("/videos/edits", operation_id="edit_video", **from_video)
    async def edit_video(request: Request) -> JSONResponse:
        """Video-to-video of an upload (multipart `video`, an mp4) or of a completed video here
        (JSON {"video": {"id": ...}})."""
        fields, upload, video_id = _source(await body_of(request, models.edit))
        return await submit(VideoRequest(**_request_fields(fields, service), source="edit",
                                         source_video_id=video_id), video=upload)

    @api.post("/videos/extensions", operation_id="extend_video", include_in_schema=models.extend is not None,
              **from_video)
    async def extend_video(request: Request) -> JSONResponse:
        """The video continued from its last frame (image-conditioned models): the source, then
        `seconds` (or `num_frames`) of new frames."""
        if models.extend is None:  # not in the document either; the pipeline's words for why
            try:
                check_extendable(service.model.spec)
            except ValueError as exc:
                raise APIError(400, str(exc), param="model") from None
        fields, upload, video_id = _source(await body_of(request, models.extend))
        return await submit(VideoRequest(**_request_fields(fields, service), source="extension",
                                         source_video_id=video_id), video=upload)

    @api.get("/videos", operation_id="list_videos", response_model=VideoList, responses=errors(400, 404))
    async def list_videos(after: Optional[str] = None, limit: int = Query(20, ge=1, le=100),
                          order: Order = Order.desc) -> JSONResponse:
        jobs, has_more = await _call(service.page, after, limit, order.value)
        data = [_video(job, service) for job in jobs]
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": has_more})

    @api.get("/videos/{video_id}", operation_id="retrieve_video", response_model=Video, responses=errors(404))
    async def retrieve_video(video_id: str) -> JSONResponse:
        job = await _call(service.get, video_id)
        headers = {} if job.done else {"openai-poll-after-ms": str(POLL_AFTER_MS)}
        return JSONResponse(_video(job, service), headers=headers)

    content_types = {media: {"schema": {"type": "string", "format": "binary"}} for _, media in VARIANTS.values()}

    @api.get("/videos/{video_id}/content", operation_id="download_content", response_class=FileResponse,
             responses={200: {"content": content_types, "description": "the file"},
                        307: {"description": "a presigned URL of the file in the bucket (--presign)"},
                        **errors(400, 404, 409, 503)})
    async def download_content(video_id: str, variant: Variant = Variant.video) -> Response:
        """The file from the data dir, streamed from the bucket, or a redirect to a presigned URL."""
        download = await _call(service.content, video_id, variant.value)
        suffix, media_type = VARIANTS[variant.value]
        if download.url is not None:
            return RedirectResponse(download.url, status_code=307)
        if download.path is not None:
            return FileResponse(download.path, media_type=media_type, filename=f"{video_id}{suffix}")
        headers = {"Content-Disposition": f'attachment; filename="{video_id}{suffix}"'}
        if download.size is not None:
            headers["Content-Length"] = str(download.size)
        return StreamingResponse(download.chunks, media_type=media_type, headers=headers)

    @api.get("/videos/{video_id}/events", operation_id="video_events", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}},
                              "description": "the Video object as `data:` events"}, **errors(404)})
    async def video_events(video_id: str) -> StreamingResponse:
        """Server-sent events: the Video object now and on every change, until it is finished."""
        await _call(service.get, video_id)  # 404 before the stream starts
        return StreamingResponse(_sse(service, video_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.delete("/videos/{video_id}", operation_id="delete_video", response_model=VideoDeleted,
                responses=errors(404, 503))
    async def delete_video(video_id: str) -> JSONResponse:
        job = await _call(service.delete, video_id)
        return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": True})

    @api.get("/models", operation_id="list_models", response_model=ModelList, responses=errors())
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model(service, started)]})

    @api.get("/models/{model_id}", operation_id="retrieve_model", response_model=Model, responses=errors(404))
    async def retrieve_model(model_id: str) -> JSONResponse:
        if model_id != service.model.id:
            raise APIError(404, f"model {model_id!r} is not served here (this server serves "
                                f"{service.model.id!r})", param="model", code="model_not_found")
        return JSONResponse(_model(service, started))

    app.include_router(api)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("wan_rt.service").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/healthz", operation_id="healthz", response_model=Health,
             responses={503: {"model": Health, "description": "the model cannot load here (error says why)"}})
    async def healthz() -> JSONResponse:
        # Alive unless the model cannot load here: then no restart of a worker will help, say why.
        if (reason := service.load_error) is not None:
            return JSONResponse({"status": "failed", "error": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", operation_id="readyz", response_model=Ready,
             responses={503: {"model": Ready, "description": WHY[503]}})
    async def readyz() -> JSONResponse:
        body = {"ready": service.ready, "draining": service.draining, "model": service.model.id,
                "error": service.load_error, "workers": service.workers()}
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/metrics", operation_id="metrics", dependencies=[Depends(authorize)], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}, **errors()})
    async def metrics() -> Response:
        content, media_type = await run_in_threadpool(service.metrics.render)
        return Response(content, media_type=media_type)

    openapi.install(app, models, api_key)
    _answer_unsupported_methods(app, {"/v1/videos/extensions": {"POST"}})
    return app


# ----------------------------------------------------------------------------- requests
def _source(body: Body) -> tuple[dict[str, Any], Optional[bytes], Optional[str]]:
    """-> (the other fields, an uploaded video, a video id): exactly one of the last two."""
    fields = body.given()
    reference, upload = fields.pop("video", None), body.files.get("video")
    if (reference is None) == (upload is None):
        raise APIError(400, "video: upload an mp4 or name a completed video ({\"id\": ...}), one of the two",
                       param="video")
    return fields, upload, reference["id"] if reference else None


def _request_fields(fields: dict[str, Any], service: VideoService) -> dict[str, Any]:
    """OpenAI's fields and wan_rt's -> VideoRequest's. `num_frames` wins over `seconds`."""
    fields = dict(fields)
    fields.pop("model", None)  # validated: the served model
    size, seconds = fields.pop("size", None), fields.pop("seconds", None)
    if size is not None:
        width, height = (int(n) for n in size.lower().split("x"))
        fields.update(width=width, height=height)
    if seconds is not None and "num_frames" not in fields:
        fields["num_frames"] = _frames_for(float(seconds), service)
    return fields


def _frames_for(seconds: float, service: VideoService) -> int:
    """Seconds -> the nearest frame count the VAE takes (4k+1 at the model's fps)."""
    stride = service.model.spec.vae.stride[0]
    return stride * max(0, round((seconds * service.model.spec.fps - 1) / stride)) + 1


# ----------------------------------------------------------------------------- responses
def _video_response(job: Job, service: VideoService) -> JSONResponse:
    return JSONResponse(_video(job, service))


def _video(job: Job, service: VideoService) -> dict[str, Any]:
    """OpenAI's Video object, plus wan_rt's own request fields. An extension's `seconds` is the
    stitched total, as OpenAI's."""
    r, fps = job.request, service.model.spec.fps
    frames = (r.num_frames or 0) + ((r.source_frames or 1) - 1 if r.source == "extension" else 0)
    return {
        "id": job.id, "object": "video", "model": job.model, "status": job.status, "progress": job.progress,
        "created_at": int(job.created_at), "completed_at": _seconds(job.completed_at),
        "expires_at": _seconds(job.expires_at), "size": f"{r.width}x{r.height}",
        "seconds": f"{frames / fps:g}", "prompt": r.prompt,
        "remixed_from_video_id": r.source_video_id if r.source == "remix" else None,
        "error": {"code": job.error.code, "message": job.error.message} if job.error else None,
        "negative_prompt": r.negative_prompt, "num_frames": r.num_frames,
        "num_inference_steps": r.num_inference_steps, "guidance_scale": r.guidance_scale,
        "guidance_scale_2": r.guidance_scale_2, "seed": r.seed, "shift": r.shift, "solver": r.solver,
        "strength": r.strength, "source": r.source, "source_video_id": r.source_video_id,
        "attempts": job.attempts, "last_error": job.last_error,
    }


def _model(service: VideoService, created: int) -> dict[str, Any]:
    spec = service.model.spec
    return {"id": service.model.id, "object": "model", "created": created, "owned_by": "wan_rt",
            "task": spec.task, "backend": service.model.backend, "fps": spec.fps,
            "defaults": {"size": f"{spec.width}x{spec.height}", "num_frames": spec.num_frames,
                         "num_inference_steps": spec.sample_steps}}


def _seconds(value: Optional[float]) -> Optional[int]:
    return None if value is None else int(value)


async def _sse(service: VideoService, video_id: str) -> AsyncIterator[str]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for job in service.events_async(video_id):
                await queue.put(_video(job, service))
        except JobNotFound:
            await queue.put({"error": {"message": f"video {video_id} was deleted", "type": "invalid_request_error",
                                       "param": None, "code": "not_found"}})
        finally:
            await queue.put(None)

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if item is None:
                return
            yield f"data: {json.dumps(item)}\n\n"
    finally:
        task.cancel()


# ----------------------------------------------------------------------------- errors
async def _call(fn: Callable, *args: Any) -> Any:
    """Run a (blocking) service call in the thread pool; its exceptions become OpenAI errors."""
    try:
        return await run_in_threadpool(fn, *args)
    except InvalidRequest as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    except JobNotFound as exc:
        raise APIError(404, str(exc), code="not_found") from None
    except QueueFull as exc:
        raise APIError(429, str(exc), type_="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(max(1, round(exc.retry_after_s)))}) from None
    except VideoNotReady as exc:
        raise APIError(409, str(exc), code="video_not_ready") from None
    except VideoExpired as exc:
        raise APIError(404, str(exc), code="video_expired") from None
    except StorageError as exc:
        raise APIError(503, str(exc), type_="server_error", code="storage_unavailable") from None
    except ModelUnavailable as exc:
        raise APIError(503, str(exc), type_="server_error", code="model_load_failed") from None


def _answer_unsupported_methods(app: FastAPI, hidden: dict[str, set[str]]) -> None:
    """A method a path does not take is a 405 whose Allow lists the methods the document gives that
    path (plus `hidden`: served, not documented). Starlette would list only the first matching
    route's methods, and send GET /v1/videos/edits to the {video_id} route: here a literal path
    wins over a templated one, as in OpenAPI."""
    table: list[tuple[re.Pattern, int, set[str]]] = []

    def paths() -> list[tuple[re.Pattern, int, set[str]]]:
        if not table:
            methods = {path: {m.upper() for m in item} for path, item in app.openapi()["paths"].items()}
            for path, extra in hidden.items():
                methods[path] = methods.get(path, set()) | extra
            for path, allowed in methods.items():
                pattern = re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(path)) + "$")
                table.append((pattern, path.count("{"), allowed))
        return table

    @app.middleware("http")
    async def allow(request: Request, call_next):
        matching = [(params, allowed) for pattern, params, allowed in paths() if pattern.match(request.url.path)]
        if matching:
            fewest = min(params for params, _ in matching)
            methods = set().union(*(allowed for params, allowed in matching if params == fewest))
            if request.method not in methods:
                allowed = ", ".join(sorted(methods))
                return JSONResponse(_error_body(f"{request.method} is not allowed here; allowed: {allowed}",
                                                "invalid_request_error", None, None),
                                    status_code=405, headers={"Allow": allowed})
        return await call_next(request)


def _error_body(message: str, type_: str, param: Optional[str], code: Optional[str]) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(_error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = str(first["loc"][-1]) if first.get("loc") else None
        message = f"{param}: {first['msg']}; got {first.get('input')!r}" if param else str(first["msg"])
        return JSONResponse(_error_body(message, "invalid_request_error", param, None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(_error_body(message, "invalid_request_error", None, None),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(_error_body(f"internal error: {type(exc).__name__}", "server_error", None, None),
                            status_code=500)
