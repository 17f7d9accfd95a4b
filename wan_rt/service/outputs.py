"""A job's files in the data dir: its inputs (the uploaded first frame; the source video of a
remix, edit or extension) and the outputs, each written to a temporary name and renamed, so a
file that exists is complete."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

# variant (as OpenAI's download_content names it) -> (suffix, media type)
VARIANTS = {"video": (".mp4", "video/mp4"), "thumbnail": (".webp", "image/webp"),
            "spritesheet": (".jpg", "image/jpeg")}
SPRITESHEET_FRAMES = 16   # at most this many frames, evenly spaced, 4 to a row
SPRITESHEET_COLUMNS = 4


class JobFiles:
    def __init__(self, data_dir: str | os.PathLike):
        self.videos = Path(data_dir) / "videos"
        self.inputs = Path(data_dir) / "inputs"
        self.videos.mkdir(parents=True, exist_ok=True)
        self.inputs.mkdir(parents=True, exist_ok=True)

    def output(self, job_id: str, variant: str = "video") -> Path:
        return self.videos / f"{job_id}{VARIANTS[variant][0]}"

    def input_image(self, job_id: str) -> Path:
        return self.inputs / f"{job_id}.png"

    def input_video(self, job_id: str) -> Path:
        return self.inputs / f"{job_id}.mp4"

    def save_input_video(self, job_id: str, data: bytes) -> Path:
        return _write_atomic(self.input_video(job_id), data)

    def save_input(self, job_id: str, image: Image.Image) -> Path:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return _write_atomic(self.input_image(job_id), buffer.getvalue())

    def write_outputs(self, job_id: str, frames: np.ndarray, fps: int) -> None:
        """frames: [F, H, W, 3] floats in [0, 1]. The mp4 comes last: its presence means all are there."""
        from wan_rt.video import export_to_video

        pixels = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
        _write_atomic(self.output(job_id, "thumbnail"), _encode(Image.fromarray(pixels[0]), "WEBP"))
        _write_atomic(self.output(job_id, "spritesheet"), _encode(_spritesheet(pixels), "JPEG"))
        export_to_video(pixels, self.output(job_id, "video"), fps=fps)  # itself temp-then-rename

    def remove(self, job_id: str, inputs: bool = True) -> None:
        paths = [self.output(job_id, v) for v in VARIANTS]
        paths += [self.input_image(job_id), self.input_video(job_id)] if inputs else []
        for path in paths:
            path.unlink(missing_ok=True)


def _spritesheet(pixels: np.ndarray) -> Image.Image:
    picks = np.linspace(0, len(pixels) - 1, min(len(pixels), SPRITESHEET_FRAMES)).round().astype(int)
    columns = min(len(picks), SPRITESHEET_COLUMNS)
    rows = -(-len(picks) // columns)
    height, width = pixels.shape[1:3]
    sheet = Image.new("RGB", (columns * width, rows * height))
    for n, index in enumerate(picks):
        sheet.paste(Image.fromarray(pixels[index]), ((n % columns) * width, (n // columns) * height))
    return sheet


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
