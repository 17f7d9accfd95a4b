"""The HTTP API's request and response models: the one source of both the validation and the
OpenAPI document, so a client generated from /openapi.json sends what the server accepts.

Request bodies depend on the served model (its name, the sizes and frame counts it takes, whether
it takes an image, whether it can extend a video), so `request_models(served)` builds them for one
model. Each body is declared once, as JSON; its multipart form (what the official `openai` client
sends) differs only in the uploads: a file part instead of the JSON object, and the client's
`video[id]` form field for `{"video": {"id": ...}}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from wan_rt.service.served_model import ServedModel
from wan_rt.service.service import MAX_SEED, SOLVERS

# Unanchored: at least one character that is not whitespace as Python's str.strip() sees it (the
# service refuses a prompt that strips to nothing; regex engines disagree on what \S excludes).
PROMPT_PATTERN = "[^" + "".join(c for c in map(chr, range(0x3001)) if c.isspace()) + "]"


Solver = Enum("Solver", {name: name for name in SOLVERS}, type=str)  # the service's list, as an enum


class Variant(str, Enum):
    video = "video"
    thumbnail = "thumbnail"
    spritesheet = "spritesheet"


class Order(str, Enum):
    asc = "asc"
    desc = "desc"


class Status(str, Enum):
    queued = "queued"
    in_progress = "in_progress"
    completed = "completed"
    failed = "failed"


# ----------------------------------------------------------------------------- responses
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    error: ErrorDetail


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """OpenAI's Video object, plus wan_rt's own request fields."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Status
    progress: int = Field(ge=0, le=100)
    created_at: int
    completed_at: Optional[int]
    expires_at: Optional[int]
    size: str = Field(description="WIDTHxHEIGHT")
    seconds: str = Field(description="the clip's length; for an extension, the stitched total")
    prompt: str
    remixed_from_video_id: Optional[str]
    error: Optional[VideoError]
    negative_prompt: Optional[str]
    num_frames: Optional[int]
    num_inference_steps: Optional[int]
    guidance_scale: Optional[float]
    guidance_scale_2: Optional[float]
    seed: Optional[int]
    shift: Optional[float]
    solver: Optional[Solver]
    strength: Optional[float] = Field(description="video-to-video: how far from the source (1: ignore it)")
    source: Optional[Literal["remix", "edit", "extension"]] = Field(
        description="what made it from another video (null: text or image to video)")
    source_video_id: Optional[str] = Field(description="the video it remixes, edits or extends (null: an upload)")
    attempts: int
    last_error: Optional[str]


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: Optional[str]
    last_id: Optional[str]
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


class ModelDefaults(BaseModel):
    size: str
    num_frames: int
    num_inference_steps: int


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    task: str
    backend: str
    fps: int
    defaults: ModelDefaults


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class Health(BaseModel):
    status: Literal["ok", "failed"]
    error: Optional[str] = None   # why the model cannot load here (status "failed")


class Ready(BaseModel):
    ready: bool
    draining: bool                # SIGTERM / SIGINT: finishing, taking no more jobs
    model: str
    error: Optional[str]          # why no worker will run: the model cannot load here
    workers: list[dict[str, Any]]


# ----------------------------------------------------------------------------- requests
class ImageReference(BaseModel):
    """input_reference as JSON: a base64 data: URL (this server fetches nothing)."""

    model_config = ConfigDict(extra="forbid")
    image_url: str = Field(pattern=r"^data:[^,;]*;base64,")


class VideoReference(BaseModel):
    """A completed video of this server, by id."""

    model_config = ConfigDict(extra="forbid")
    id: str


def _integral(value: Any) -> Any:
    """JSON Schema counts 22.0 as an integer; pydantic's strict mode would not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


@dataclass(frozen=True)
class RequestModels:
    """The served model's request bodies (JSON form; see module docstring for multipart)."""

    create: type[BaseModel]
    remix: type[BaseModel]
    edit: type[BaseModel]
    extend: Optional[type[BaseModel]]       # None: this model cannot extend a video (T2V)
    image: str                               # "none" | "optional" | "required": create's input_reference
    frames: tuple[int, ...]                  # the frame counts it takes
    seconds: tuple[str, ...]                 # `seconds` as text: the lengths of those frame counts


def request_frames(served: ServedModel) -> tuple[int, ...]:
    """The frame counts a request may ask for: 4k+1 up to the server's limit."""
    return tuple(range(1, served.limits.max_frames + 1, served.spec.vae.stride[0]))


def request_models(served: ServedModel) -> RequestModels:
    spec, limits = served.spec, served.limits
    frames = request_frames(served)
    seconds = tuple(f"{n / spec.fps:g}" for n in frames)
    multiple = spec.spatial_multiple
    sides = "|".join(str(n) for n in range(multiple, limits.max_side + 1, multiple))
    size = (Optional[str], Field(None, pattern=rf"^({sides})x({sides})$",
                                 description=f"WIDTHxHEIGHT, each a multiple of {multiple} up to {limits.max_side}"))
    model = (Optional[Literal[(served.id,)]], Field(None, description="the served model (the only one)"))
    longest = limits.max_frames / spec.fps
    seconds_field = (Optional[Union[Literal[seconds], Annotated[float, Field(gt=0, le=longest)]]], Field(
        None, description=f"the clip's length: one of the listed texts, or a number of seconds up to "
                          f"{longest:g}; rounded to the nearest frame count the model takes"))
    frames_field = (Optional[Annotated[Literal[frames], BeforeValidator(_integral)]], Field(None, description="frames to generate (wins over seconds)"))
    strength = (Optional[Annotated[float, Field(gt=0, le=1)]], Field(None, description=(
        "wan_rt: how far the result may move from the source video: the fraction of the denoising "
        "steps that run (1: the source only sets the size and length)")))

    def optional(kind: Any, **constraints) -> tuple:
        """An optional field whose constraints the JSON schema shows (inside the Optional; an
        integer's before the validator that takes 22.0, or the schema would not show them)."""
        integral = (BeforeValidator(_integral),) if kind is int else ()
        return (Optional[Annotated[(kind, Field(**constraints), *integral)]], None)

    common = dict(
        negative_prompt=(Optional[str], None),
        num_inference_steps=optional(int, ge=1, le=limits.max_steps),
        guidance_scale=optional(float, ge=0, le=100),
        guidance_scale_2=optional(float, ge=0, le=100),
        seed=optional(int, ge=0, le=MAX_SEED),
        shift=optional(float, gt=0, le=1000),
        solver=(Optional[Solver], None),
    )
    prompt = (str, Field(min_length=1, pattern=PROMPT_PATTERN, description="what the video shows"))
    video = (Union[VideoReference, None], Field(None, description=(
        "the source: {\"id\": ...} of a completed video here (JSON), or an mp4 upload (multipart)")))
    image = "none" if spec.task == "t2v" else ("required" if spec.task == "i2v" else "optional")
    create_fields: dict[str, Any] = dict(prompt=prompt, model=model, size=size, seconds=seconds_field,
                                         num_frames=frames_field, **common)
    if image != "none":
        create_fields["input_reference"] = (Optional[ImageReference], Field(
            None, description="the first frame: an image upload (multipart) or a data: URL (JSON)"))

    def body(name: str, **fields) -> type[BaseModel]:
        return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)

    return RequestModels(
        create=body("VideoCreate", **create_fields),
        remix=body("VideoRemix", prompt=prompt, strength=strength, **common),
        edit=body("VideoEdit", prompt=prompt, video=video, model=model, size=size, strength=strength, **common),
        extend=(body("VideoExtend", prompt=prompt, video=video, model=model, seconds=seconds_field,
                     num_frames=frames_field, **common) if spec.task != "t2v" else None),
        image=image, frames=frames, seconds=seconds)

