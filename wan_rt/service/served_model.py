"""What the service needs to know about the model it serves, read without loading it.

The only module of the service that reaches below the pipeline's public API (checkpoint
resolution, the engines index, the request checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from wan_rt.config import ModelSpec


@dataclass(frozen=True)
class RequestLimits:
    """The largest request the service takes: it bounds a worker's memory and time, and it is in
    the OpenAPI document (sizes and frame counts as enums), so a generated client stays inside it."""

    max_side: int          # width and height, each
    max_frames: int        # frames a job generates (a video-to-video source is cut to this many)
    max_steps: int = 1000
    max_source_frames: int = 321        # a remixed, edited or extended video (uploads: also its bytes)
    max_source_seconds: float = 20.0

    @staticmethod
    def for_spec(spec: ModelSpec) -> "RequestLimits":
        """Twice the model's default size and length: room to explore, not an 8K request by accident."""
        from wan_rt.video import MAX_VIDEO_FRAMES

        stride = spec.vae.stride[0]
        return RequestLimits(max_side=2 * max(spec.height, spec.width),
                             max_frames=stride * ((2 * spec.num_frames - 2) // stride) + 1,
                             max_source_frames=MAX_VIDEO_FRAMES, max_source_seconds=MAX_VIDEO_FRAMES / spec.fps)


@dataclass(frozen=True)
class ServedModel:
    id: str                      # the name clients pass as `model`
    model: Optional[str]         # what from_pretrained loads (preset or folder); None: the engines' own
    engines_dir: Optional[str]   # run these engines instead of eager
    backend: str                 # "eager" or the engines' backend
    spec: ModelSpec
    limits: RequestLimits

    def check(self, height: int, width: int, num_frames: int, steps: int) -> None:
        """The CLI's one-line ValueErrors for a size, frame count or step count this model cannot
        run, then the service's limits (the error's `field` names the request field)."""
        from wan_rt.config import RequestError, check_request

        check_request(self.spec, height, width, num_frames, steps)
        limits = self.limits
        if max(height, width) > limits.max_side:
            raise RequestError(f"width and height must be at most {limits.max_side} on this server; "
                               f"got width {width}, height {height}", "size")
        if num_frames > limits.max_frames:
            raise RequestError(f"num_frames must be at most {limits.max_frames} on this server; got {num_frames}",
                               "num_frames")
        if steps > limits.max_steps:
            raise RequestError(f"num_inference_steps must be at most {limits.max_steps} on this server; "
                               f"got {steps}", "num_inference_steps")
        if self.engines_dir is not None:
            from wan_rt.runtime.engines_dir import check_fits

            check_fits(Path(self.engines_dir), self.spec, height, width, num_frames)


def describe(model: Optional[str] = None, engines_dir: Optional[str] = None) -> ServedModel:
    """model and/or engines_dir as from_pretrained takes them (neither: the embedded tiny preset).
    Makes a tiny preset's weights if needed, so the workers started next only read them."""
    from wan_rt.config import DEFAULT_SPEC
    from wan_rt.resolve import resolve_checkpoint
    from wan_rt.runtime.engines_dir import read_index

    backend = "eager"
    source = model
    if engines_dir is not None:
        index = read_index(Path(engines_dir))
        backend = index["backend"]
        source = model or index["model"]
        engines_dir = str(Path(engines_dir).resolve())
    source = source or DEFAULT_SPEC
    spec = resolve_checkpoint(source).spec
    if Path(source).exists():  # a folder: workers get its absolute path, clients its name
        source = str(Path(source).resolve())
        served_id = Path(source).name
    else:
        served_id = source
    load = source if engines_dir is None or model is not None else None
    return ServedModel(served_id, load, engines_dir, backend, spec, RequestLimits.for_spec(spec))
