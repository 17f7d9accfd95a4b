"""`wan-rt run`'s video-in flags: --video (video-to-video), --strength, --extend."""

from __future__ import annotations

import argparse
from typing import Any, Optional


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--video", default=None, metavar="IN.mp4",
                        help="video-to-video: re-generate this clip with --prompt (--frames default: its length, "
                             "trimmed to 4k+1)")
    source.add_argument("--extend", default=None, metavar="IN.mp4",
                        help="continue this clip from its last frame by --frames new frames (i2v, ti2v models); "
                             "the output is the clip plus the new frames")
    p.add_argument("--strength", type=float, default=None,
                   help="with --video: how much to change it, in (0, 1]: the last int(steps * strength) steps run "
                        "(1: text-to-video from the same noise); default 0.8")


def check_video_arguments(args: argparse.Namespace, spec, num_frames: int, steps: int) -> tuple[Optional[Any], int]:
    """-> (the decoded source frames or None, the frame count to generate), after every check a
    bad source or flag fails, before anything heavy loads (ValueError: one line, exit 2)."""
    from wan_rt.pipeline import DEFAULT_STRENGTH, check_extendable, source_frame_count, strength_start
    from wan_rt.video import load_video

    if args.strength is not None and not args.video:
        raise ValueError("--strength applies to --video")
    if args.extend:
        check_extendable(spec)
        if args.image:
            raise ValueError("--extend continues from the clip's last frame; drop --image")
        return load_video(args.extend), num_frames
    if not args.video:
        return None, num_frames
    strength_start(steps, DEFAULT_STRENGTH if args.strength is None else args.strength)
    source = load_video(args.video)
    return source, source_frame_count(len(source), args.frames)
