"""Schemathesis hooks for `wan-rt serve`'s schema (SCHEMATHESIS_HOOKS=schemathesis_hooks, with
tests/ on PYTHONPATH). A JSON Schema can say "a file part of type video/mp4" (or image/png) but
not "a video ffmpeg decodes": without this, every generated upload is random bytes, which the
server rightly refuses (a 400 naming the field), and schemathesis counts that as valid data
rejected."""

from __future__ import annotations

import io

import av
import numpy as np
import schemathesis
from hypothesis import strategies as st


def _mp4(frames: int, height: int, width: int, seed: int) -> bytes:
    """An H.264 mp4 of random frames, written by PyAV (this module must not need wan_rt: the
    `schemathesis` command may run in another Python)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _image(fmt: str, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


# First frames (input_reference on image-to-video models), one per type the schema lists.
for media_type, fmt in (("image/png", "PNG"), ("image/jpeg", "JPEG"), ("image/webp", "WEBP")):
    schemathesis.openapi.media_type(media_type, st.sampled_from([_image(fmt, seed) for seed in range(2)]))

# A few small clips: square and not, one frame and several, sizes the model takes and one it does not.
CLIPS = [_mp4(*shape, seed) for seed, shape in enumerate([(5, 32, 32), (1, 16, 16), (9, 32, 48), (3, 24, 40)])]
schemathesis.openapi.media_type("video/mp4", st.sampled_from(CLIPS))


def _fill_required_parts() -> None:
    """Work around schemathesis 4.32.5's coverage phase: for a form with a registered part strategy
    (the mp4 above) it fills the other required parts with "" whatever their schema says
    (coverage/_operation.py, _generate_multipart_body_from_custom_strategies), so a required
    `prompt` arrives empty and the server's rightful 400 counts as valid data rejected. Here those
    text parts (the only required ones here besides the upload) get text their pattern admits."""
    from schemathesis.specs.openapi.coverage import _operation

    original = _operation._generate_multipart_body_from_custom_strategies

    def filled(body):
        generated = original(body)
        if generated is None:
            return None
        values, content_types = generated
        for name, value in values.items():
            schema = body.form_properties.get(name, {})
            if value == "" and name not in content_types and schema.get("type") == "string":
                text = st.from_regex(schema.get("pattern", "."), fullmatch=False)
                values[name] = _operation.examples.generate_one(text.filter(lambda t: len(t) >= schema.get("minLength", 0)))
        return values, content_types

    _operation._generate_multipart_body_from_custom_strategies = filled


_fill_required_parts()
