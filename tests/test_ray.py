"""The encoder in Ray Data on a local 2-worker cluster (CPU): the features equal `extract`'s for the same files; a
bad file keeps its row, with its error."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from siglip2_encoder import ExtractedFeatures
from siglip2_encoder.cli import EXIT_OK, main
from siglip2_encoder.integrations.ray_data import EncodeImages, paths_dataset


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def extracted(photos, tiny_checkpoint, tmp_path_factory) -> ExtractedFeatures:
    out = tmp_path_factory.mktemp("extracted") / "out"
    folder = Path(photos[0]).parent
    assert main(["-q", "extract", str(folder), "--model", str(tiny_checkpoint), "--tokens", "-o", str(out)]) == EXIT_OK
    return ExtractedFeatures.open(out)


def encode(dataset, checkpoint: Path, **options) -> list[dict]:
    kwargs = {"model": str(checkpoint)} | options
    # Each actor takes half a CPU: two actors and the reading tasks fit the two-CPU cluster.
    return dataset.map_batches(
        EncodeImages, fn_constructor_kwargs=kwargs, batch_size=2, concurrency=2, num_cpus=0.5
    ).take_all()


def test_ray_read_images_gives_extracts_features(cluster, photos, tiny_checkpoint, extracted):
    dataset = ray.data.read_images(str(Path(photos[0]).parent), include_paths=True, mode="RGB")
    rows = encode(dataset, tiny_checkpoint, tokens=True)
    assert len(rows) == len(photos)
    names, pooled = extracted.pooled()
    want = dict(zip(names, pooled))
    for row in rows:
        path = str(Path("/", row["path"])) if not Path(row["path"]).is_absolute() else row["path"]
        assert row["error"] is None
        torch.testing.assert_close(torch.from_numpy(row["pooled"]), want[path], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            torch.from_numpy(row["last_hidden_state"]), extracted.tokens(path), atol=1e-5, rtol=0
        )


def test_bad_files_keep_their_rows_with_the_error(cluster, photos, tiny_checkpoint, extracted, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    rows = encode(paths_dataset([photos[0], str(bad), photos[1]]), tiny_checkpoint)
    by_path = {row["path"]: row for row in rows}  # Ray Data does not keep the order of rows (preserve_order=False)
    assert len(rows) == 3 and set(by_path) == {photos[0], str(bad), photos[1]}
    broken = by_path[str(bad)]
    assert broken["error"].startswith(f"{bad}: not an image") and all(math.isnan(v) for v in broken["pooled"])
    names, pooled = extracted.pooled()
    for row in (by_path[photos[0]], by_path[photos[1]]):
        assert row["error"] is None
        torch.testing.assert_close(torch.from_numpy(row["pooled"]), pooled[names.index(row["path"])], atol=1e-5, rtol=0)


def test_encode_images_refuses_bad_settings():
    with pytest.raises(ValueError, match="give exactly one of model"):
        EncodeImages()
    with pytest.raises(ValueError, match=r"dtype must be one of \['bf16', 'fp16', 'fp32'\], got dtype='fp64'"):
        EncodeImages(random_weights="siglip2-base-patch16-224", dtype="fp64")
    encoder = EncodeImages(random_weights="siglip2-base-patch16-224")
    with pytest.raises(ValueError, match=r"the batch has columns \['x'\]; EncodeImages reads 'image', 'path' or"):
        encoder({"x": np.zeros(2)})
