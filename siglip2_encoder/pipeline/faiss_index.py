"""An approximate nearest-neighbour index over a folder's pooled features, through FAISS (``faiss-cpu``, optional).

Built once and saved beside the features (``index.faiss`` and ``index.json``); cosine similarity, as the exact
search of :mod:`~siglip2_encoder.pipeline.retrieval` (vectors L2-normalised, inner-product metric), so the two rank
alike and an index's recall against exact search can be measured (``benchmarks/RESULTS.md``).

An index cannot outlive its features: ``index.json`` records a fingerprint of the folder (``run.json``, every
shard's commit record, and each feature file's size and modification time), and :meth:`FaissIndex.load` refuses an
index whose folder has changed since (a resumed or overwritten extraction), naming the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..files import write_atomic
from .store import RUN_FILE, SHARD_GLOB, ExtractedFeatures, sole_writer

__all__ = ["INDEX_FILE", "INDEX_RECORD", "FaissIndex", "auto_factory"]

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
INDEX_RECORD = "index.json"
EXACT_BELOW = 50_000  # vectors: under this, exact search is fast enough that "auto" builds a flat (exact) index
TRAIN_PER_LIST = 40  # training vectors per inverted list (faiss asks for at least 39)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "the approximate index needs FAISS: pip install 'siglip2-encoder[faiss]' (or faiss-cpu)"
        ) from None
    return faiss


def auto_factory(num_vectors: int) -> tuple[str, int | None]:
    """The FAISS factory string and ``nprobe`` that ``factory="auto"`` picks for ``num_vectors``: exact ("Flat")
    below :data:`EXACT_BELOW`, otherwise an inverted file of about 4 sqrt(N) lists (a power of two), searched in
    1/16 of them (recall@10 in benchmarks/RESULTS.md)."""
    if num_vectors < EXACT_BELOW:
        return "Flat", None
    lists = 2 ** round(math.log2(4 * math.sqrt(num_vectors)))
    return f"IVF{lists},Flat", max(1, lists // 16)


def fingerprint(features: ExtractedFeatures) -> str:
    """A digest of everything the folder's features are: run settings, commit records, feature files' stats."""
    digest = hashlib.sha256((features.folder / RUN_FILE).read_bytes())
    for record in sorted(features.folder.glob(SHARD_GLOB)):
        digest.update(record.name.encode() + record.read_bytes())
        tensors = record.with_suffix(".safetensors")
        if tensors.exists():
            stat = tensors.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _normalised(vectors: torch.Tensor) -> np.ndarray:
    return F.normalize(vectors.float(), dim=-1).numpy()


@dataclass
class FaissIndex:
    """A FAISS index over the pooled features of an ``extract`` / ``embed-text`` folder.

    Attributes:
        index: the ``faiss.Index``; its row i is the i-th successful row of the folder, in shard order (the order of
            :meth:`ExtractedFeatures.pooled` and of exact search).
        factory: the FAISS factory string it was built from (e.g. ``"IVF1024,Flat"``, ``"HNSW32"``).
        nprobe: inverted lists searched per query (IVF indexes), None otherwise.
    """

    index: Any
    factory: str
    nprobe: int | None = None

    @classmethod
    def build(
        cls, features: ExtractedFeatures, factory: str = "auto", *, nprobe: int | None = None, seed: int = 0
    ) -> FaissIndex:
        """Index the folder's pooled features, streaming them shard by shard.

        Args:
            features: an opened folder with pooled features.
            factory: a FAISS factory string (``"Flat"``, ``"IVF4096,Flat"``, ``"HNSW32"``, ``"IVF4096,PQ64"``, ...),
                or ``"auto"`` (:func:`auto_factory`). The metric is always inner product on normalised vectors.
            nprobe: lists searched per query for IVF indexes (default: auto's choice, 1/16 of the lists).
            seed: the training sample's random seed.
        """
        faiss = _faiss()
        count = len(features.ok)
        if count == 0:
            raise ValueError(f"{features.folder} holds no features to index")
        dim = features.dimension()
        auto_nprobe = None
        if factory == "auto":
            factory, auto_nprobe = auto_factory(count)
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            message = str(err).strip().splitlines()[-1]
            raise ValueError(f"factory {factory!r} is not a FAISS index description ({message})") from None
        ivf = faiss.try_extract_index_ivf(index)
        if not index.is_trained:
            lists = ivf.nlist if ivf is not None else 1
            sample = _sample(features, min(count, TRAIN_PER_LIST * max(lists, 256)), seed)
            if len(sample) < lists:
                raise ValueError(f"factory {factory!r} has {lists} lists but the folder holds only {count} vectors")
            logger.info("training %s on %d of %d vectors", factory, len(sample), count)
            index.train(sample)
        for _, tensor, _ in features.iter_shards("pooled"):
            index.add(_normalised(tensor))
        if ivf is None:
            if nprobe is not None:
                raise ValueError(f"nprobe applies to IVF indexes; {factory!r} is not one")
            return cls(index, factory)
        return cls(index, factory, nprobe or auto_nprobe or max(1, ivf.nlist // 16))

    def save(self, features: ExtractedFeatures) -> None:
        """Write ``index.faiss`` and ``index.json`` (with the folder's fingerprint) into the features' folder."""
        faiss = _faiss()
        with sole_writer(features.folder):  # no extract run may change the features while they are fingerprinted
            record = {
                "factory": self.factory,
                "nprobe": self.nprobe,
                "num_vectors": int(self.index.ntotal),
                "dimension": int(self.index.d),
                "metric": "cosine",
                "fingerprint": fingerprint(features),
            }
            write_atomic(features.folder / INDEX_FILE, lambda tmp: faiss.write_index(self.index, tmp))
            write_atomic(features.folder / INDEX_RECORD, (json.dumps(record, indent=2) + "\n").encode())

    @classmethod
    def load(cls, features: ExtractedFeatures) -> FaissIndex:
        """The index saved in the features' folder; refused if the folder changed since it was built."""
        faiss = _faiss()
        record_file = features.folder / INDEX_RECORD
        command = f"`siglip2-encoder index --features {features.folder}`"
        if not record_file.is_file() or not (features.folder / INDEX_FILE).is_file():
            raise ValueError(f"{features.folder} has no FAISS index; build it with {command}")
        record = json.loads(record_file.read_text())
        if record.get("fingerprint") != fingerprint(features):
            raise ValueError(
                f"the FAISS index of {features.folder} is older than its features; rebuild it with {command}"
            )
        return cls(faiss.read_index(str(features.folder / INDEX_FILE)), record["factory"], record["nprobe"])

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As :func:`~siglip2_encoder.pipeline.retrieval.top_k`: (Q, k) cosine similarities, highest first, and (Q, k)
        row indices; an approximate index may find fewer than k for a query: those places hold index -1, score -inf."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got k={k!r}")
        if queries.shape[-1] != self.index.d:
            raise ValueError(f"the index holds {self.index.d}-dimensional vectors, queries have {queries.shape[-1]}")
        faiss = _faiss()
        k = min(k, int(self.index.ntotal))
        params = faiss.SearchParametersIVF(nprobe=self.nprobe) if self.nprobe else None
        scores, indices = self.index.search(_normalised(queries.cpu()), k, params=params)
        scores, indices = torch.from_numpy(scores), torch.from_numpy(indices)
        return scores.masked_fill(indices < 0, float("-inf")), indices


def _sample(features: ExtractedFeatures, size: int, seed: int) -> np.ndarray:
    """``size`` rows drawn uniformly without replacement, read shard by shard."""
    count = len(features.ok)
    chosen = np.sort(np.random.default_rng(seed).choice(count, size, replace=False))
    parts, offset = [], 0
    for _, tensor, _ in features.iter_shards("pooled"):
        local = chosen[(chosen >= offset) & (chosen < offset + len(tensor))] - offset
        parts.append(_normalised(tensor[torch.from_numpy(local)]))
        offset += len(tensor)
    return np.concatenate(parts)
