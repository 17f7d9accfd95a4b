"""Images and videos in, frames out: input preprocessing (images, source videos decoded from
mp4), output postprocessing, mp4 writing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

ImageInput = Union[Image.Image, np.ndarray, Tensor, str, os.PathLike]
# Frames (uint8 or [0, 1] floats, [F, H, W, 3]; or PIL images), an mp4's path, or its bytes.
VideoInput = Union[np.ndarray, Tensor, Sequence[Image.Image], str, os.PathLike, bytes]

# Bounds on a source video (video-to-video, extension), so one request cannot exhaust memory:
# decoded frames are held whole (at the largest frame, 321 frames are ~2 GB of uint8). 321 frames
# = 20 s at Wan's 16 fps, e.g. an 81-frame clip extended three times by 81 frames.
MAX_VIDEO_BYTES = 64 * 2**20
MAX_VIDEO_FRAMES = 321
MAX_VIDEO_PIXELS = 1920 * 1088  # per frame


class VideoInputError(ValueError):
    """A source video that cannot be used (unreadable, empty, over a bound): one line."""


def load_image(image: ImageInput) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image array must be [H, W, 3], got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def image_to_tensor(image: ImageInput, height: int, width: int) -> Tensor:
    """-> float32 [1, 3, height, width] in [-1, 1]; Lanczos resize, as diffusers' VideoProcessor."""
    pil = load_image(image).resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(pil, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def video_to_output(video: Tensor, output_type: str):
    """video: [B, 3, F, H, W] in [-1, 1] -> np [B, F, H, W, 3] in [0, 1] | pt [B, F, 3, H, W] | pil."""
    return frames_to_output((video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4), output_type)


def frames_to_output(frames: Tensor, output_type: str):
    """frames: [B, F, 3, H, W] in [0, 1] -> np [B, F, H, W, 3] | pt (as is) | pil."""
    if output_type == "pt":
        return frames
    array = frames.permute(0, 1, 3, 4, 2).cpu().numpy()
    if output_type == "np":
        return array
    if output_type == "pil":
        return [[Image.fromarray((f * 255).round().astype(np.uint8)) for f in clip] for clip in array]
    raise ValueError(f"output_type must be one of np, pt, pil, latent; got {output_type!r}")


def export_to_video(frames: Union[np.ndarray, Sequence[Image.Image], Tensor], path: Union[str, os.PathLike],
                    fps: int = 16) -> str:
    """Write frames ([F, H, W, 3] floats in [0, 1] or uint8, or PIL images) to an H.264 mp4.

    The file appears only when complete: frames go to a temporary file that is renamed at the
    end, and removed if anything fails, so no half-written mp4 is left behind.
    """
    import imageio_ffmpeg

    if isinstance(frames, Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    out = Path(path)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix or '.mp4'}")
    height, width = frames.shape[1:3]
    try:
        writer = imageio_ffmpeg.write_frames(str(tmp), (width, height), fps=fps, codec="libx264",
                                             pix_fmt_out="yuv420p", macro_block_size=1,
                                             output_params=["-crf", "18"], ffmpeg_log_level="error")
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(out)


def load_video(video: VideoInput, max_frames: int = MAX_VIDEO_FRAMES, max_bytes: int = MAX_VIDEO_BYTES,
               max_pixels: int = MAX_VIDEO_PIXELS) -> np.ndarray:
    """Any VideoInput -> uint8 [F, H, W, 3] RGB frames, within the bounds (VideoInputError if not).
    mp4 (any container/codec ffmpeg reads) from a path or bytes is decoded by ffmpeg."""
    if isinstance(video, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(video), max_frames, max_bytes, max_pixels)
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if not path.is_file():
            raise FileNotFoundError(f"video not found: {path}")
        if path.stat().st_size > max_bytes:
            raise VideoInputError(f"video {path} is {path.stat().st_size} bytes; the limit is {max_bytes}")
        return _decode_file(path, str(path), max_frames, max_pixels)
    if isinstance(video, Tensor):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise VideoInputError(f"video frames must be [F, H, W, 3], got shape {tuple(video.shape)}")
        frames = video if video.dtype == np.uint8 else (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)
    else:
        images = [load_image(f) for f in video]
        if len({im.size for im in images}) > 1:
            raise VideoInputError(f"video frames differ in size: {sorted({im.size for im in images})}")
        frames = np.stack([np.asarray(im) for im in images]) if images else np.zeros((0, 1, 1, 3), np.uint8)
    _check_bounds(len(frames), frames.shape[2], frames.shape[1], "video", max_frames, max_pixels)
    return frames


def video_to_tensor(frames: np.ndarray, height: int, width: int) -> Tensor:
    """uint8 [F, H, W, 3] -> float32 [1, 3, F, height, width] in [-1, 1], each frame resized as
    an input image is (image_to_tensor: Lanczos, no crop; diffusers' VideoProcessor does the same)."""
    return torch.stack([image_to_tensor(f, height, width)[0] for f in frames], dim=1)[None]


def _check_bounds(count: int, width: int, height: int, name: str, max_frames: int, max_pixels: int) -> None:
    if count == 0:
        raise VideoInputError(f"{name} has no frames")
    if count > max_frames:
        raise VideoInputError(f"{name} has more than {max_frames} frames (the limit)")
    if width * height > max_pixels:
        raise VideoInputError(f"{name} frames are {width}x{height}; the limit is {max_pixels} pixels per frame")


def _decode_bytes(data: bytes, max_frames: int, max_bytes: int, max_pixels: int) -> np.ndarray:
    if len(data) > max_bytes:
        raise VideoInputError(f"video is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise VideoInputError("video is empty (0 bytes)")
    # ffmpeg needs a seekable input for mp4 (the index may sit at the end): a temporary file.
    with tempfile.TemporaryDirectory(prefix="wan_rt_video_") as tmp:
        path = Path(tmp) / "input"
        path.write_bytes(data)
        return _decode_file(path, "the uploaded video", max_frames, max_pixels)


def _decode_file(path: Path, name: str, max_frames: int, max_pixels: int) -> np.ndarray:
    """ffmpeg -> RGB frames, stopping as soon as a bound is crossed."""
    import imageio_ffmpeg

    frames = []
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        width, height = meta["size"]
        _check_bounds(1, width, height, name, max_frames, max_pixels)
        for raw in reader:
            if len(frames) == max_frames:
                raise VideoInputError(f"{name} has more than {max_frames} frames (the limit)")
            frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
    except (RuntimeError, OSError, KeyError, StopIteration) as exc:
        detail = next((line for line in reversed(str(exc).splitlines()) if line.strip()), type(exc).__name__)
        raise VideoInputError(f"cannot decode {name}: {detail.strip()}") from None
    finally:
        reader.close()  # stops ffmpeg when we stopped early
    _check_bounds(len(frames), width, height, name, max_frames, max_pixels)
    return np.stack(frames)
