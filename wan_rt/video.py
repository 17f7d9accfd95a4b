"""Images in, frames out: input-image preprocessing, output postprocessing, mp4 writing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

ImageInput = Union[Image.Image, np.ndarray, Tensor, str, os.PathLike]


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
    frames = (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]
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
