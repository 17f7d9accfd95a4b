"""Jobs made from another video (remix, edit, extension): the source is read and bounded when the
job is submitted (a bad video is a 400 naming `video`), and its mp4 is kept with the job
(JobFiles.save_input_video), so neither a restart nor the source's deletion loses it."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wan_rt.service.jobs import InvalidRequest, VideoRequest
from wan_rt.service.served_model import ServedModel

SOURCES = ("remix", "edit", "extension")


@dataclass(frozen=True)
class SourceVideo:
    data: bytes     # the mp4, as kept with the job
    frames: int
    height: int
    width: int


def read_source(data: bytes, served: ServedModel) -> SourceVideo:
    """Decode (bounded in bytes, frames, pixels and duration) -> what the request needs of it."""
    from wan_rt.video import VideoInputError, load_video

    limits = served.limits
    try:
        seconds = _duration(data) if data else 0.0  # load_video names an empty upload
        if seconds > limits.max_source_seconds:
            raise VideoInputError(f"the video is {seconds:g} s long; this server takes at most "
                                  f"{limits.max_source_seconds:g} s")
        frames = load_video(data, max_frames=limits.max_source_frames)
    except (ValueError, OSError) as exc:  # VideoInputError is a ValueError
        raise InvalidRequest(f"video: {exc}", "video") from None
    return SourceVideo(data, len(frames), frames.shape[1], frames.shape[2])


def from_source(request: VideoRequest, source: SourceVideo, served: ServedModel) -> VideoRequest:
    """The request with what the source decides: its size (unless asked for, or one this model
    cannot make), and for video-to-video its length (4k+1 of its first frames, at most the
    server's frame limit) and the default strength; an extension keeps the source's length."""
    from wan_rt.pipeline import DEFAULT_STRENGTH, source_frame_count

    spec, limits = served.spec, served.limits
    if request.height is None and request.width is None and _makes(served, source.height, source.width):
        request = dataclasses.replace(request, height=source.height, width=source.width)
    if request.source == "extension":
        return dataclasses.replace(request, source_frames=source.frames, strength=None)
    frames = source_frame_count(min(source.frames, limits.max_frames), None)
    strength = DEFAULT_STRENGTH if request.strength is None else request.strength
    return dataclasses.replace(request, num_frames=frames, source_frames=source.frames, strength=strength)


def check_source(request: VideoRequest, served: ServedModel) -> VideoRequest:
    """What the model cannot run with this source, in one line (InvalidRequest); a strength too
    small to run one of the steps runs one (the job shows the strength it ran)."""
    from wan_rt.pipeline import check_extendable, strength_start

    if request.source not in SOURCES:
        raise InvalidRequest(f"source must be one of {', '.join(SOURCES)}; got {request.source!r}", "source")
    if request.source == "extension":
        try:
            check_extendable(served.spec)
        except ValueError as exc:
            raise InvalidRequest(str(exc), "model") from None
        return request
    steps, strength = request.num_inference_steps, request.strength
    if not 0 < strength <= 1:
        raise InvalidRequest(f"strength must be in (0, 1]; got {strength}", "strength")
    if int(steps * strength) < 1:
        strength = 1 / steps
        while int(steps * strength) < 1:  # 1/steps * steps may round below 1
            strength = math.nextafter(strength, 2.0)
    strength_start(steps, strength)
    return dataclasses.replace(request, strength=strength)


def _makes(served: ServedModel, height: int, width: int) -> bool:
    try:
        served.check(height, width, 1, 1)
    except ValueError:
        return False
    return True


def _duration(data: bytes) -> float:
    """Seconds, from the container (ffmpeg reads it without decoding a frame)."""
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory(prefix="wan_rt_upload_") as tmp:
        path = Path(tmp) / "video"
        path.write_bytes(data)
        reader = imageio_ffmpeg.read_frames(str(path))
        try:
            return float(next(reader).get("duration") or 0.0)
        except (RuntimeError, OSError, StopIteration) as exc:  # ffmpeg's last line says why
            detail = next((line for line in reversed(str(exc).splitlines()) if line.strip()), "not a video")
            raise OSError(f"cannot decode the uploaded video: {detail.strip()}") from None
        finally:
            reader.close()
