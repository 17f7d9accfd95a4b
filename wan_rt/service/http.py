"""The HTTP layer: OpenAI's Videos API, progress as server-sent events, health, metrics and the
web page, on a VideoService. `create_app(service)` -> a FastAPI app; `wan-rt serve` runs it.

The official `openai` client works unchanged (`client.videos.create_and_poll(...)`, `retrieve`,
`download_content`, `list`, `delete`); wan_rt's own fields go in `extra_body`. Errors have
OpenAI's shape, {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import re
import time
from importlib import resources
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from wan_rt.service.jobs import InvalidRequest, Job, JobNotFound, ModelUnavailable, QueueFull, VideoRequest
from wan_rt.service.outputs import VARIANTS
from wan_rt.service.service import VideoExpired, VideoNotReady, VideoService
from wan_rt.service.storage import StorageError

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
POLL_AFTER_MS = 250        # what the openai client's poll() waits between retrieves (openai-poll-after-ms)
KEEPALIVE_S = 15.0         # an SSE comment this often keeps proxies from closing a quiet stream
_INT_FIELDS = ("num_frames", "num_inference_steps", "seed")
_FLOAT_FIELDS = ("guidance_scale", "guidance_scale_2", "shift")
_TEXT_FIELDS = ("prompt", "negative_prompt", "solver", "model", "size", "seconds")
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def create_app(service: VideoService, api_key: Optional[str] = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """api_key: when set, /v1/* and /metrics need `Authorization: Bearer <key>` (compared in
    constant time); the page, /healthz and /readyz stay open (the page asks for the key)."""
    app = FastAPI(title="wan_rt", summary="OpenAI-compatible video generation", docs_url="/docs")
    started = int(time.time())
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

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @api.post("/videos")
    async def create_video(request: Request) -> JSONResponse:
        """Multipart form (as the openai client sends it) or JSON: prompt, model, size ("WxH"),
        seconds, input_reference (an image upload, or {"image_url": "data:..."}), and wan_rt's
        negative_prompt, num_frames (wins over seconds), num_inference_steps, guidance_scale,
        guidance_scale_2, seed, shift, solver."""
        fields, image = await _read_create_body(request, max_upload_bytes)
        video_request = _video_request(fields, service)
        job = await _call(service.submit, video_request, image)
        return JSONResponse(_video(job, service))

    @api.get("/videos")
    async def list_videos(after: Optional[str] = None, limit: int = 20, order: str = "desc") -> JSONResponse:
        if not 1 <= limit <= 100:
            raise APIError(400, f"limit must be between 1 and 100; got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be asc or desc; got {order!r}", param="order")
        jobs, has_more = await _call(service.page, after, limit, order)
        data = [_video(job, service) for job in jobs]
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": has_more})

    @api.get("/videos/{video_id}")
    async def retrieve_video(video_id: str) -> JSONResponse:
        job = await _call(service.get, video_id)
        headers = {} if job.done else {"openai-poll-after-ms": str(POLL_AFTER_MS)}
        return JSONResponse(_video(job, service), headers=headers)

    @api.get("/videos/{video_id}/content")
    async def download_content(video_id: str, variant: str = "video") -> Response:
        """The file from the data dir, streamed from the bucket, or a redirect to a presigned URL."""
        download = await _call(service.content, video_id, variant)
        suffix, media_type = VARIANTS[variant]
        if download.url is not None:
            return RedirectResponse(download.url, status_code=307)
        if download.path is not None:
            return FileResponse(download.path, media_type=media_type, filename=f"{video_id}{suffix}")
        headers = {"Content-Disposition": f'attachment; filename="{video_id}{suffix}"'}
        if download.size is not None:
            headers["Content-Length"] = str(download.size)
        return StreamingResponse(download.chunks, media_type=media_type, headers=headers)

    @api.get("/videos/{video_id}/events")
    async def video_events(video_id: str) -> StreamingResponse:
        """Server-sent events: the Video object now and on every change, until it is finished."""
        await _call(service.get, video_id)  # 404 before the stream starts
        return StreamingResponse(_sse(service, video_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.delete("/videos/{video_id}")
    async def delete_video(video_id: str) -> JSONResponse:
        job = await _call(service.delete, video_id)
        return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": True})

    @api.get("/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model(service, started)]})

    @api.get("/models/{model_id}")
    async def retrieve_model(model_id: str) -> JSONResponse:
        if model_id != service.model.id:
            raise APIError(404, f"model {model_id!r} is not served here (this server serves "
                                f"{service.model.id!r})", param="model", code="model_not_found")
        return JSONResponse(_model(service, started))

    app.include_router(api)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("wan_rt.service").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        # Alive unless the model cannot load here: then no restart of a worker will help, say why.
        if (reason := service.load_error) is not None:
            return JSONResponse({"status": "failed", "error": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        body = {"ready": service.ready, "draining": service.draining, "model": service.model.id,
                "error": service.load_error, "workers": service.workers()}
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def metrics() -> Response:
        content, media_type = await run_in_threadpool(service.metrics.render)
        return Response(content, media_type=media_type)

    return app


# ----------------------------------------------------------------------------- requests
async def _read_create_body(request: Request, limit: int) -> tuple[dict[str, Any], Optional[bytes]]:
    """-> (fields, uploaded image bytes). The body is read up to `limit` bytes (413 beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    request._body = b"".join(chunks)  # Starlette's form parser reads the cached body
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            fields = json.loads(request._body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise APIError(400, "the JSON body must be an object")
        reference = fields.pop("input_reference", None)
        return fields, _reference_image(reference)
    if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise APIError(400, "send the request as multipart/form-data or application/json; got "
                            f"{content_type or 'no content type'}")
    form = await request.form(max_files=2, max_fields=64)
    fields, image = {}, None
    for key, value in form.multi_items():
        if key == "input_reference" and isinstance(value, UploadFile):
            image = await value.read()
        elif key == "input_reference[image_url]":
            image = _reference_image({"image_url": value})
        elif key.startswith("input_reference"):
            image = _reference_image({key[len("input_reference["):-1]: value})
        elif isinstance(value, UploadFile):
            raise APIError(400, f"unexpected file in field {key!r}; only input_reference takes a file", param=key)
        else:
            fields[key] = value
    return fields, image


def _reference_image(reference: Any) -> Optional[bytes]:
    """input_reference as an object: {"image_url": "data:image/png;base64,..."}. wan_rt fetches nothing."""
    if reference is None:
        return None
    if not isinstance(reference, dict):
        raise APIError(400, "input_reference must be an image upload or {\"image_url\": \"data:...\"}",
                       param="input_reference")
    if "file_id" in reference:
        raise APIError(400, "input_reference.file_id is not supported here: upload the image itself",
                       param="input_reference")
    url = reference.get("image_url")
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise APIError(400, "input_reference.image_url must be a base64 data: URL (this server fetches nothing)",
                       param="input_reference")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "input_reference.image_url is not valid base64", param="input_reference") from None


def _video_request(fields: dict[str, Any], service: VideoService) -> VideoRequest:
    """OpenAI's fields and wan_rt's -> a VideoRequest. `num_frames` wins over `seconds`."""
    fields = {k: v for k, v in fields.items() if v is not None}
    for name in fields:
        if name not in (*_TEXT_FIELDS, *_INT_FIELDS, *_FLOAT_FIELDS):
            raise APIError(400, f"unknown parameter {name!r}", param=name)
    values: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        if name in fields:
            if not isinstance(fields[name], (str, int, float)) or isinstance(fields[name], bool):
                raise APIError(400, f"{name} must be a string", param=name)
            values[name] = str(fields[name])
    for name in _INT_FIELDS:
        if name in fields:
            values[name] = _number(fields[name], name, int)
    for name in _FLOAT_FIELDS:
        if name in fields:
            values[name] = _number(fields[name], name, float)
    if "prompt" not in values:
        raise APIError(400, "prompt is required", param="prompt")
    model = values.pop("model", None)
    if model is not None and model != service.model.id:
        raise APIError(400, f"model {model!r} is not served here; this server serves {service.model.id!r}",
                       param="model", code="model_not_found")
    height = width = None
    if "size" in values:
        match = _SIZE.match(values.pop("size"))
        if match is None:
            raise APIError(400, f"size must be WIDTHxHEIGHT, e.g. 832x480; got {fields['size']!r}", param="size")
        width, height = int(match[1]), int(match[2])
    seconds = values.pop("seconds", None)
    if seconds is not None and "num_frames" not in values:
        values["num_frames"] = _frames_for(_number(seconds, "seconds", float), service)
    return VideoRequest(height=height, width=width, **values)


def _frames_for(seconds: float, service: VideoService) -> int:
    """Seconds -> the nearest frame count the VAE takes (4k+1 at the model's fps)."""
    if not seconds > 0:
        raise APIError(400, f"seconds must be > 0; got {seconds:g}", param="seconds")
    stride = service.model.spec.vae.stride[0]
    return stride * max(0, round((seconds * service.model.spec.fps - 1) / stride)) + 1


def _number(value: Any, name: str, kind: Callable) -> Any:
    """Form fields arrive as text ("7", "5.0"); JSON as numbers. Booleans are not numbers."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if kind is float:
            return float(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise ValueError
    except (TypeError, ValueError, OverflowError):
        what = "an integer" if kind is int else "a number"
        raise APIError(400, f"{name} must be {what}; got {value!r}", param=name) from None


# ----------------------------------------------------------------------------- responses
def _video(job: Job, service: VideoService) -> dict[str, Any]:
    """OpenAI's Video object, plus wan_rt's own request fields."""
    r, fps = job.request, service.model.spec.fps
    return {
        "id": job.id, "object": "video", "model": job.model, "status": job.status, "progress": job.progress,
        "created_at": int(job.created_at), "completed_at": _seconds(job.completed_at),
        "expires_at": _seconds(job.expires_at), "size": f"{r.width}x{r.height}",
        "seconds": f"{(r.num_frames or 0) / fps:g}", "prompt": r.prompt, "remixed_from_video_id": None,
        "error": {"code": job.error.code, "message": job.error.message} if job.error else None,
        "negative_prompt": r.negative_prompt, "num_frames": r.num_frames,
        "num_inference_steps": r.num_inference_steps, "guidance_scale": r.guidance_scale,
        "guidance_scale_2": r.guidance_scale_2, "seed": r.seed, "shift": r.shift, "solver": r.solver,
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
        raise APIError(400, str(exc), code="video_not_ready") from None
    except VideoExpired as exc:
        raise APIError(404, str(exc), code="video_expired") from None
    except StorageError as exc:
        raise APIError(503, str(exc), type_="server_error", code="storage_unavailable") from None
    except ModelUnavailable as exc:
        raise APIError(503, str(exc), type_="server_error", code="model_load_failed") from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request is larger than the {limit / 2**20:g} MB upload limit",
                    param="input_reference", code="request_too_large")


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
        message = str(first["msg"])
        return JSONResponse(_error_body(f"{param}: {message}" if param else message, "invalid_request_error",
                                        param, None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(_error_body(message, "invalid_request_error", None, None),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(_error_body(f"internal error: {type(exc).__name__}", "server_error", None, None),
                            status_code=500)
