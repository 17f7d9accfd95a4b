"""Request bodies: JSON or multipart (the official `openai` client's form), read up to the upload
limit, validated by the served model's pydantic models (api_models), explained in one line.

FastAPI declares one content type per body; these endpoints take two (as OpenAI's do), so a body
is read here and validated by the same model the OpenAPI document shows (openapi.py)."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from wan_rt.service.api_models import request_frames
from wan_rt.service.served_model import ServedModel

FILE_FIELDS = ("input_reference", "video")   # the uploads; `name[key]` form fields are their JSON objects
_INT = re.compile(r"\s*[+-]?\d+\s*")


class APIError(Exception):
    """An OpenAI-shaped error answer: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


@dataclass
class Body:
    """A validated body: the model's fields (None where not sent) and the uploaded files' bytes."""

    fields: BaseModel
    files: dict[str, bytes] = field(default_factory=dict)

    def given(self) -> dict[str, Any]:
        """The fields the client sent, enums as their values."""
        return self.fields.model_dump(mode="json", exclude_none=True)


async def read_body(request: Request, model: type[BaseModel], served: ServedModel, limit: int) -> Body:
    raw = await _read_limited(request, limit)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        return Body(_validate(model, raw, served))
    if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise APIError(400, "send the request as multipart/form-data or application/json; got "
                            f"{content_type or 'no content type'}")
    request._body = raw  # Starlette's form parser reads the cached body
    form = await request.form(max_files=2, max_fields=64)
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    properties = model.model_json_schema()["properties"]
    for key, value in form.multi_items():
        name, _, sub = key.partition("[")
        if name in fields or name in files:
            raise APIError(400, f"{name} is given more than once", param=name)
        if name in FILE_FIELDS and not sub:
            if name not in properties:  # not a field of this body: validation names it below
                fields[name] = "(a file)"
                continue
            files[name] = await value.read() if isinstance(value, UploadFile) else value.encode()
        elif isinstance(value, UploadFile):
            raise APIError(400, f"unexpected file in field {key!r}", param=name)
        elif sub and sub.endswith("]") and name in FILE_FIELDS:   # the client's input_reference[image_url]
            fields[name] = {sub[:-1]: value}
        else:
            fields[key] = _form_value(properties.get(key, {}), value)
    return Body(_validate(model, json.dumps(fields).encode(), served), files)


def data_url_bytes(url: str, param: str) -> bytes:
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError, IndexError):
        raise APIError(400, f"{param}.image_url is not valid base64", param=param) from None


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, up to `limit` bytes (413 beyond, before reading more than that)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request is larger than the {limit / 2**20:g} MB upload limit",
                    code="request_too_large")


def _form_value(schema: dict, text: str) -> Any:
    """A form field's text as the JSON value the schema takes: form fields carry only text."""
    options = schema.get("anyOf", [schema])
    types = {o.get("type") for o in options}
    texts = [v for o in options if o.get("type") == "string" for v in o.get("enum", [])]
    if "string" in types and (not texts or text in texts) or any("$ref" in o for o in options):
        return text
    if "integer" in types and _INT.fullmatch(text):
        return int(text)
    if "number" in types or "integer" in types:
        try:
            return float(text)
        except ValueError:
            pass
    return text


def _validate(model: type[BaseModel], raw: bytes, served: ServedModel) -> BaseModel:
    if not raw.strip():
        raise APIError(400, "the request has no body; send the fields as JSON or a multipart form")
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise APIError(400, "the JSON body must be an object")
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise _explain(exc.errors()[0], value, served) from None


def _explain(error: dict, body: dict, served: ServedModel) -> APIError:
    """pydantic's first complaint as one line that names the field, in the CLI's words where the
    CLI has words for it (sizes, frame counts, steps)."""
    loc = [str(part) for part in error.get("loc", ()) if re.fullmatch(r"\w+", str(part))]  # no union tags
    name = loc[0] if loc else None
    got = body.get(name) if name else None
    kind = error.get("type", "")
    if kind == "extra_forbidden" and name == "input_reference" and served.spec.task == "t2v":
        return APIError(400, f"{served.spec.name} is a text-to-video model; input_reference needs an i2v or "
                             "ti2v model", param=name)
    if kind == "extra_forbidden":
        return APIError(400, f"unknown parameter {'.'.join(loc)!r}", param=name)
    if loc == ["input_reference", "image_url"]:
        return APIError(400, "input_reference.image_url must be a base64 data: URL (this server fetches nothing)",
                        param=name)
    if kind == "missing":
        return APIError(400, f"{'.'.join(loc)} is required", param=name)
    if name == "model":
        return APIError(400, f"model {got!r} is not served here; this server serves {served.id!r}",
                        param="model", code="model_not_found")
    if name == "seconds":
        frames = request_frames(served)
        texts = ", ".join(f"{n / served.spec.fps:g}" for n in frames)
        return APIError(400, f"seconds must be one of {texts} or a number of seconds up to "
                             f"{frames[-1] / served.spec.fps:g} on this server; got {got!r}", param=name)
    words = _cli_words(name, got, served)
    if words is not None:
        return APIError(400, words, param=name)
    if kind.startswith(("int_", "float_")) and isinstance(got, (str, bool)) or kind == "int_from_float":
        what = "an integer" if kind.startswith("int") else "a number"
        return APIError(400, f"{name} must be {what}; got {got!r}", param=name)
    return APIError(400, f"{'.'.join(loc)}: {error.get('msg', 'invalid')}; got {got!r}", param=name)


def _cli_words(name: Optional[str], value: Any, served: ServedModel) -> Optional[str]:
    """The service's (and `wan-rt run`'s) message for a size, frame count or step count."""
    spec = served.spec
    args = {"height": spec.height, "width": spec.width, "num_frames": spec.num_frames, "steps": spec.sample_steps}
    if name == "size":
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value) if isinstance(value, str) else None
        if match is None:
            return f"size must be WIDTHxHEIGHT, e.g. 832x480; got {value!r}"
        args.update(width=int(match[1]), height=int(match[2]))
    elif name in ("num_frames", "num_inference_steps") and isinstance(value, int) and not isinstance(value, bool):
        args["num_frames" if name == "num_frames" else "steps"] = value
    else:
        return None
    try:
        served.check(args["height"], args["width"], args["num_frames"], args["steps"])
    except ValueError as exc:
        return str(exc)
    return None
