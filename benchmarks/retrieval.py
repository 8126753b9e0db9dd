"""Search latency, memory and recall over an extract-layout folder: exact (chunked, shard by shard) vs FAISS.

    python benchmarks/retrieval.py                          # 100k and 1M vectors of width 768 (~4 GB on disk)
    python benchmarks/retrieval.py --sizes 20000 --queries 10

For each size: a folder in ``extract``'s layout (shards of 1024 rows) of generated vectors drawn around 1000
centres (embeddings cluster; uniform random vectors would be the worst case for an inverted-file index); queries
are noisy copies of stored vectors. Then, each measurement in a fresh process so its memory is its own:

* exact: :func:`siglip2_encoder.pipeline.retrieval.top_k` over the folder's shards, as ``siglip2-encoder search`` does;
* FAISS: ``FaissIndex.build`` with ``factory="auto"`` (time, size on disk), then load + search as ``search
  --faiss`` does; recall@10 against the exact top 10.

Latency: median of 3 after a warm-up, for 1 query and for a batch. Peak memory: the process's peak resident set
above what it held after its imports (the OS page cache that holds the shard files is not counted).
Prints a Markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import faiss
import numpy as np
import torch
from timing import median_seconds

from siglip2_encoder.pipeline.faiss_index import INDEX_FILE, FaissIndex
from siglip2_encoder.pipeline.retrieval import top_k
from siglip2_encoder.pipeline.settings import ExtractSettings
from siglip2_encoder.pipeline.store import RUN_FILE, ExtractedFeatures, ShardWriter, write_manifest


def make_folder(folder: Path, count: int, dim: int, centres: int, shard: int = 1024, seed: int = 0) -> None:
    """Vectors around ``centres`` random centres (0: i.i.d. Gaussian, no structure: an IVF index's worst case)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(max(centres, 1), dim, generator=generator) * (centres > 0)
    folder.mkdir(parents=True)
    (folder / RUN_FILE).write_text(json.dumps(ExtractSettings(model="generated").__dict__, default=list))
    writer, rows = ShardWriter(folder, torch.float32), []
    for start in range(0, count, shard):
        n = min(shard, count - start)
        chosen = torch.randint(0, len(means), (n,), generator=generator)
        block = means[chosen] + 0.7 * torch.randn(n, dim, generator=generator)
        block_rows = [{"path": f"v{i}", "status": "ok"} for i in range(start, start + n)]
        writer.write(block_rows, [{"pooled": v} for v in block])
        rows += block_rows
    write_manifest(folder, rows)


def _status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak since the last reset) of this process, in MiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def _reset_peak() -> float:
    """Start peak tracking anew (Linux: "5" to clear_refs resets VmHWM); returns the resident size now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def _child(kind: str, folder: str, queries: str, k: int, out: multiprocessing.Queue) -> None:
    q = torch.load(queries)
    store = ExtractedFeatures.open(folder)
    baseline = _reset_peak()
    result: dict = {}
    if kind == "build":
        start = time.perf_counter()
        index = FaissIndex.build(store)
        index.save(store)
        result = {"build_s": time.perf_counter() - start, "factory": index.factory, "nprobe": index.nprobe}
    else:
        index = FaissIndex.load(store) if kind == "faiss" else None

        def search(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if index is not None:
                return index.search(x, k)
            return top_k(x, (t for _, t, _ in store.iter_shards("pooled")), k)

        result["one_s"] = median_seconds(lambda: search(q[:1]))
        result["batch_s"] = median_seconds(lambda: search(q))
        _, indices = search(q)
        result["indices"] = indices.tolist()
    result["peak_mib"] = _status_mib("VmHWM") - baseline
    out.put(result)


def run_child(*args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=768, help="vector width (768: B/16; So400m is 1152)")
    parser.add_argument("--centres", type=int, default=1000, help="clusters of the vectors (0: none, worst case)")
    parser.add_argument("--queries", type=int, default=100, help="queries in the batched measurement")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--workdir", help="where the folders go (default: a temporary one, deleted at the end)")
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory(prefix="retrieval_bench_")  # deleted when the program ends
    work = Path(args.workdir or scratch.name)
    rows = []
    for size in args.sizes:
        folder = work / f"n{size}"
        start = time.perf_counter()
        make_folder(folder, size, args.dim, args.centres)
        made = time.perf_counter() - start
        _, bank = ExtractedFeatures.open(folder).pooled()
        generator = torch.Generator().manual_seed(1)
        chosen = torch.randint(0, size, (args.queries,), generator=generator)
        queries = bank[chosen] + 0.3 * torch.randn(args.queries, args.dim, generator=generator)
        del bank
        torch.save(queries, work / "queries.pt")
        exact = run_child("exact", str(folder), str(work / "queries.pt"), args.k)
        build = run_child("build", str(folder), str(work / "queries.pt"), args.k)
        approx = run_child("faiss", str(folder), str(work / "queries.pt"), args.k)
        recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(approx["indices"], exact["indices"])])
        index_mib = (folder / INDEX_FILE).stat().st_size / 2**20
        rows.append((size, made, exact, build, approx, recall, index_mib))
        print(
            f"{size}: folder {made:.0f} s, exact {exact['batch_s']:.2f} s, faiss {approx['batch_s']:.3f} s, "
            f"recall {recall:.3f}"
        )

    print(
        f"\n### Search: exact vs FAISS over an extract folder, {args.dim}-wide vectors, cpu\n\n"
        f"{date.today()}, {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"faiss {faiss.__version__}. Generated vectors around {args.centres} centres (0: no clusters), "
        f"shards of 1024 rows; queries are noisy "
        f"copies of stored vectors. Latency: median of 3 after a warm-up. Memory: peak resident set of the "
        f"searching process above its baseline.\n"
    )
    print(
        f"| vectors | search | index | build (s) | 1 query (ms) | batch of {args.queries} (ms) | per query (ms) "
        f"| peak memory (MiB) | recall@{args.k} |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size, _, exact, build, approx, recall, index_mib in rows:
        print(
            f"| {size:,} | exact | - | - | {1000 * exact['one_s']:.0f} | {1000 * exact['batch_s']:.0f} | "
            f"{1000 * exact['batch_s'] / args.queries:.1f} | {exact['peak_mib']:.0f} | 1.000 |"
        )
        factory = build["factory"] + (f", nprobe {build['nprobe']}" if build["nprobe"] else "")
        print(
            f"| {size:,} | FAISS | {factory} ({index_mib:.0f} MiB) | {build['build_s']:.0f} | "
            f"{1000 * approx['one_s']:.1f} | {1000 * approx['batch_s']:.0f} | "
            f"{1000 * approx['batch_s'] / args.queries:.2f} | {approx['peak_mib']:.0f} | {recall:.3f} |"
        )


if __name__ == "__main__":
    main()
