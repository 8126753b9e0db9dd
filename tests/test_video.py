"""Video files as extract's input: frames sampled by count or rate, each its own row with its time, decoded by PyAV
to the same pixels as PyAV's own frame-by-frame decoding; an unreadable video is recorded, not lost."""

from __future__ import annotations

import json
import multiprocessing

import av
import numpy as np
import pytest
import torch
from PIL import Image

from siglip2_encoder import ExtractedFeatures
from siglip2_encoder.cli import EXIT_OK, EXIT_PARTIAL, main
from siglip2_encoder.data.video import VideoFrame, expand_video, read_frame
from siglip2_encoder.pipeline.settings import ExtractSettings


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """25 frames of 64x48 noise at 10 fps (2.5 s), in an MPEG-4 file; and every decoded frame, as PyAV gives them."""
    folder = tmp_path_factory.mktemp("video")
    path = folder / "clip.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(25):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        decoded = [(f.time, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    return path, decoded


def first_at_or_after(decoded, time):
    return next(pixels for t, pixels in decoded if t >= time - 1e-6)


def test_frames_are_sampled_by_count_or_rate(video):
    path, _ = video
    assert [f.time for f in expand_video(str(path), num_frames=5)] == [0.25, 0.75, 1.25, 1.75, 2.25]
    assert [f.time for f in expand_video(str(path), fps=2)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert str(VideoFrame(str(path), 1.25)) == f"{path}@1.250s"


def test_a_seeked_frame_equals_pyavs_sequential_decoding(video):
    path, decoded = video
    for time in (0.0, 0.35, 1.25, 2.4):
        assert np.array_equal(read_frame(VideoFrame(str(path), time)), first_at_or_after(decoded, time))


def test_a_frame_decodes_in_a_worker_forked_after_this_process_converted_frames(video):
    """extract's decoding workers are forked. PyAV 19 keeps one frame converter per thread, with FFmpeg's slice
    threads: a process forked after its parent converted a frame inherits the converter without its threads, and
    PyAV's own ``to_ndarray`` there waits for them forever. ``read_frame`` converts with a converter of its own."""
    path, decoded = video
    with av.open(str(path)) as container:
        next(container.decode(video=0)).to_ndarray(format="rgb24")  # this process's converter, with its threads
    with multiprocessing.get_context("fork").Pool(1) as pool:
        pixels = pool.apply_async(read_frame, (VideoFrame(str(path), 1.25),)).get(timeout=60)
    assert np.array_equal(pixels, first_at_or_after(decoded, 1.25))


def test_extract_takes_video_frames_as_rows_with_their_times(video, tiny_checkpoint, tmp_path):
    path, decoded = video
    (path.parent / "broken.mp4").write_bytes(b"not a video at all")
    options = ["--model", str(tiny_checkpoint), "--tokens", "--batch-size", "2"]
    code = main(["extract", str(path.parent), "--num-frames", "3", *options, "-o", str(tmp_path / "out")])
    assert code == EXIT_PARTIAL  # the broken video
    store = ExtractedFeatures.open(tmp_path / "out")
    rows = [(r["path"].rsplit("/", 1)[-1], r.get("time"), r["status"]) for r in store.rows]
    assert rows == [
        ("broken.mp4", None, "failed"),
        ("clip.mp4@0.417s", 0.416667, "ok"),
        ("clip.mp4@1.250s", 1.25, "ok"),
        ("clip.mp4@2.083s", 2.083333, "ok"),
    ]
    assert store.rows[0]["error"].startswith(f"{path.parent / 'broken.mp4'}: cannot open the video")
    # Each frame's features are those of the same pixels given as an image file.
    frames = tmp_path / "frames"
    frames.mkdir()
    for row in store.ok:
        Image.fromarray(first_at_or_after(decoded, row["time"])).save(frames / f"{row['time']}.png")
    assert main(["extract", str(frames), *options, "-o", str(tmp_path / "images")]) == EXIT_OK
    images = ExtractedFeatures.open(tmp_path / "images")
    for row in store.ok:
        want = images.tokens(str(frames / f"{row['time']}.png"))
        torch.testing.assert_close(store.tokens(row["path"]), want, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["video_frames"] == 3


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(video_fps=2.0, video_frames=3), "give at most one of video_fps and video_frames"),
        (dict(video_fps=0.0), "video_fps must be > 0, got video_fps=0.0"),
        (dict(video_frames=0), "video_frames must be a positive int, got video_frames=0"),
    ],
)
def test_bad_video_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ExtractSettings(model="m", **fields)
