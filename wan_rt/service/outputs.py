"""A job's files: the uploaded first frame and the outputs (the mp4, its thumbnail and
spritesheet), named here and kept in the service's storage (storage.py: the data dir or a bucket).
An object that exists is complete; the mp4 is written last, so its presence means all are there."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from wan_rt.service.storage import LocalStorage, Storage, StorageError

# variant (as OpenAI's download_content names it) -> (suffix, media type)
VARIANTS = {"video": (".mp4", "video/mp4"), "thumbnail": (".webp", "image/webp"),
            "spritesheet": (".jpg", "image/jpeg")}
SPRITESHEET_FRAMES = 16   # at most this many frames, evenly spaced, 4 to a row
SPRITESHEET_COLUMNS = 4


class JobFiles:
    def __init__(self, data_dir: str | os.PathLike, storage: Optional[Storage] = None):
        self.storage: Storage = storage if storage is not None else LocalStorage(data_dir)
        # The data dir's folders: the local storage's objects, and the mp4 being encoded.
        self.videos = Path(data_dir) / "videos"
        self.inputs = Path(data_dir) / "inputs"
        self.scratch = Path(data_dir) / "scratch"
        for folder in (self.videos, self.inputs, self.scratch):
            folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def output_key(job_id: str, variant: str = "video") -> str:
        return f"videos/{job_id}{VARIANTS[variant][0]}"

    @staticmethod
    def input_key(job_id: str) -> str:
        return f"inputs/{job_id}.png"

    def output(self, job_id: str, variant: str = "video") -> Path:
        """The output's file in the data dir (local storage only)."""
        return self._local().path(self.output_key(job_id, variant))

    def input_image(self, job_id: str) -> Path:
        """The uploaded first frame's file in the data dir (local storage only)."""
        return self._local().path(self.input_key(job_id))

    def save_input(self, job_id: str, image: Image.Image) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        self.storage.put_bytes(self.input_key(job_id), buffer.getvalue(), "image/png")

    def load_input(self, job_id: str) -> Image.Image:
        key = self.input_key(job_id)
        try:
            data = self.storage.read(key)
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {self.storage.where(key)}") from None
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read image {self.storage.where(key)}: {exc}") from None

    def write_outputs(self, job_id: str, frames: np.ndarray, fps: int) -> None:
        """frames: [F, H, W, 3] floats in [0, 1]. The mp4 comes last: its presence means all are there."""
        from wan_rt.video import export_to_video

        pixels = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
        for variant, image, fmt in (("thumbnail", Image.fromarray(pixels[0]), "WEBP"),
                                    ("spritesheet", _spritesheet(pixels), "JPEG")):
            self.storage.put_bytes(self.output_key(job_id, variant), _encode(image, fmt), VARIANTS[variant][1])
        mp4 = self.scratch / f"{job_id}.{os.getpid()}.mp4"
        try:
            export_to_video(pixels, mp4, fps=fps)  # itself temp-then-rename
            self.storage.put_file(self.output_key(job_id), mp4, VARIANTS["video"][1])
        finally:
            mp4.unlink(missing_ok=True)

    def remove(self, job_id: str, inputs: bool = True) -> None:
        keys = [self.output_key(job_id, v) for v in VARIANTS] + ([self.input_key(job_id)] if inputs else [])
        self.storage.delete(keys)

    def remove_quietly(self, job_id: str, inputs: bool = True) -> Optional[str]:
        """remove(), for clean-ups that must not fail what they clean up after; -> the error, if any."""
        try:
            self.remove(job_id, inputs)
        except StorageError as exc:
            return str(exc)
        return None

    def _local(self) -> LocalStorage:
        if not isinstance(self.storage, LocalStorage):
            raise TypeError("the outputs are in a bucket, not in the data dir: read them with VideoService.content")
        return self.storage


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
