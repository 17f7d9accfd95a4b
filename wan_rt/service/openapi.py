"""/openapi.json: FastAPI's document of the routes, completed with what FastAPI cannot infer from
them: the request bodies (JSON and multipart, from api_models), links between the operations
(create -> retrieve -> content -> delete) and the bearer key when there is one. Validation errors
are 400s here (OpenAI's shape), so FastAPI's 422s leave the document."""

from __future__ import annotations

import copy
from typing import Any, Optional

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from wan_rt.service.api_models import RequestModels

FILE_TYPES = {"input_reference": "image/png, image/jpeg, image/webp", "video": "video/mp4"}
# operation -> (its body's model name in RequestModels, the upload it takes)
BODIES = {"create_video": ("create", "input_reference"), "remix_video": ("remix", None),
          "edit_video": ("edit", "video"), "extend_video": ("extend", "video")}
VIDEO_LINKS = {"retrieve": "retrieve_video", "content": "download_content", "events": "video_events",
               "delete": "delete_video", "remix": "remix_video"}


def install(app: FastAPI, models: RequestModels, api_key: Optional[str]) -> None:
    """Replace app.openapi with the completed document (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app, models, api_key)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document(app: FastAPI, models: RequestModels, api_key: Optional[str]) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    operations = {op["operationId"]: op for item in doc["paths"].values() for op in item.values()}
    for path, item in doc["paths"].items():
        for op in item.values():
            op.get("responses", {}).pop("422", None)
            if api_key is not None and (path.startswith("/v1/") or path == "/metrics"):
                op["security"] = [{"bearer": []}]
    for operation_id, (which, upload) in BODIES.items():
        model = getattr(models, which)
        if operation_id in operations and model is not None:
            operations[operation_id]["requestBody"] = _body(model, upload, schemas, models.image == "required")
    for operation_id in (*BODIES, "retrieve_video"):
        if operation_id in operations:
            operations[operation_id]["responses"]["200"]["links"] = _links(operation_id, operations)
    if api_key is not None:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def _body(model: type[BaseModel], upload: Optional[str], schemas: dict, image_required: bool) -> dict[str, Any]:
    """JSON: the model; multipart: the same fields as text, the upload as a file part."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    json_schema = copy.deepcopy(schema)
    form = copy.deepcopy(schema)
    form["properties"] = {name: _no_null(prop) for name, prop in form["properties"].items()}
    encoding = {}
    if upload is not None and upload in schema["properties"]:
        form["properties"][upload] = {"type": "string", "format": "binary",
                                      "description": schema["properties"][upload].get("description", "")}
        encoding[upload] = {"contentType": FILE_TYPES[upload]}
        if upload == "video":   # JSON names a completed video here; a form uploads one
            json_schema["properties"]["video"] = _no_null(json_schema["properties"]["video"])
            for body in (json_schema, form):
                body["required"].append("video")
        elif image_required:
            for body in (json_schema, form):
                body["required"].append(upload)
            json_schema["properties"][upload] = _no_null(json_schema["properties"][upload])
    multipart: dict[str, Any] = {"schema": form}
    if encoding:
        multipart["encoding"] = encoding
    return {"required": True, "content": {"application/json": {"schema": json_schema},
                                          "multipart/form-data": multipart}}


def _no_null(prop: dict) -> dict:
    """A form field is text or absent, never null."""
    prop = {k: v for k, v in prop.items() if k != "default" or v is not None}
    if "anyOf" in prop:
        options = [o for o in prop["anyOf"] if o.get("type") != "null"]
        prop = {k: v for k, v in prop.items() if k != "anyOf"} | (options[0] if len(options) == 1
                                                                   else {"anyOf": options})
    return prop


def _links(operation_id: str, operations: dict) -> dict[str, Any]:
    return {name.capitalize(): {"operationId": target, "parameters": {"video_id": "$response.body#/id"}}
            for name, target in VIDEO_LINKS.items()
            if target in operations and target != operation_id}
