"""Video files as inputs: frames sampled at a rate or a count, each frame one input of its own, decoded by PyAV.

A video is expanded into :class:`VideoFrame` s from its container's metadata alone (duration), before anything is
decoded; each frame is then decoded on its own (a seek to the keyframe before it, then forward to the first frame at
or after its time), so a long video never sits in memory and frames spread over the decoding workers like files.
A video PyAV cannot open becomes one failed input, recorded with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["VIDEO_EXTENSIONS", "VideoFrame", "expand_video", "read_frame"]

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".ts"})


@dataclass(frozen=True)
class VideoFrame:
    """One frame to extract: ``path``'s frame at ``time`` seconds; or, with ``error``, a video that cannot be read."""

    path: str
    time: float | None
    error: str | None = None

    def __str__(self) -> str:
        """The frame's id in the manifest: ``video.mp4@1.250s`` (the path alone for an unreadable video)."""
        return self.path if self.time is None else f"{self.path}@{self.time:.3f}s"


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("video input needs PyAV: pip install 'siglip2-encoder[video]'") from None
    return av


def expand_video(path: str, *, fps: float | None = None, num_frames: int | None = None) -> list[VideoFrame]:
    """The frames to take from ``path``: every ``1 / fps`` seconds from 0, or ``num_frames`` evenly spaced (the
    centres of equal parts of the video). Exactly one of the two is given."""
    if (fps is None) == (num_frames is None):
        raise ValueError(f"give exactly one of fps and num_frames, got fps={fps!r}, num_frames={num_frames!r}")
    av = _av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return [VideoFrame(path, None, "the file has no video stream")]
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000  # av.time_base
            else:
                return [VideoFrame(path, None, "the video states no duration")]
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        return [VideoFrame(path, None, f"cannot open the video: {err}")]
    if num_frames is not None:
        times = [duration * (k + 0.5) / num_frames for k in range(num_frames)]
    else:
        times = [k / fps for k in range(max(1, math.ceil(duration * fps - 1e-9)))]
    return [VideoFrame(path, round(t, 6)) for t in times]


def read_frame(frame: VideoFrame) -> np.ndarray:
    """The (H, W, 3) uint8 RGB pixels of the first frame at or after ``frame.time`` (the last one, if the video
    ends before it). Raises ValueError naming the frame when it cannot be decoded."""
    if frame.error is not None:
        raise ValueError(f"{frame.path}: {frame.error}")
    av = _av()
    from av.video.reformatter import VideoReformatter

    try:
        with av.open(frame.path) as container:
            stream = container.streams.video[0]
            if frame.time > 0 and stream.time_base is not None:
                container.seek(int(frame.time / stream.time_base), stream=stream, backward=True, any_frame=False)
            last = None
            for decoded in container.decode(stream):
                last = decoded
                if decoded.time is None or decoded.time >= frame.time - 1e-6:
                    break
            if last is None:
                raise ValueError(f"{frame}: no frame could be decoded")
            # A converter of our own, on one thread, not PyAV's `to_ndarray(format=...)`: PyAV 19 keeps one
            # converter per thread with FFmpeg's slice threads, and extract's forked workers would inherit their
            # parent's without the threads (swscale then waits for them forever). Frames spread over the workers.
            rgb = VideoReformatter().reformat(last, format="rgb24", threads=1)
            return rgb.to_ndarray()
    except av.error.FFmpegError as err:
        raise ValueError(f"{frame}: cannot decode the frame: {err}") from None
