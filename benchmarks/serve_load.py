"""A bounded load test of `siglip2-encoder serve` on loopback: image-embedding requests from 1, 8 and 32 concurrent
clients, with and without dynamic batching; throughput and p50 / p99 latency.

    python benchmarks/serve_load.py [--preset siglip2-base-patch16-224] [--requests 48]

The server runs in its own process on 127.0.0.1 (a free port) with a random-weight tower saved to a temporary
folder; every configuration sends the same fixed number of requests (a 224x224 PNG each) and stops; each request
has a 120 s timeout. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import torch
from PIL import Image

from siglip2_encoder import SigLIP2Encoder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(folder: str, port: int, batching: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "siglip2_encoder.cli", "-q", "serve", "--model", folder, "--port", str(port)]
    process = subprocess.Popen(command + ([] if batching else ["--no-batching"]), env={**os.environ})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not come up")


async def load(url: str, body: bytes, clients: int, requests: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    todo = iter(range(requests))

    async def client(session: httpx.AsyncClient) -> None:
        for _ in todo:
            started = time.perf_counter()
            response = await session.post(f"{url}/embed/image", content=body, timeout=120)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with httpx.AsyncClient() as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return time.perf_counter() - started, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="siglip2-base-patch16-224")
    parser.add_argument("--requests", type=int, default=48)
    args = parser.parse_args()
    torch.manual_seed(0)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buffer, "PNG")
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.preset}, {args.requests} requests per row"
    )
    print("| batching | clients | requests/s | p50 latency s | p99 latency s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        SigLIP2Encoder.from_preset(args.preset).save_pretrained(folder)
        for batching in (False, True):
            port = free_port()
            server = start(folder, port, batching)
            try:
                for clients in (1, 8, 32):
                    wall, latencies = asyncio.run(
                        load(f"http://127.0.0.1:{port}", buffer.getvalue(), clients, args.requests)
                    )
                    p50, p99 = np.percentile(latencies, [50, 99])
                    print(
                        f"| {'on' if batching else 'off'} | {clients} | {args.requests / wall:.2f} | {p50:.3f} | "
                        f"{p99:.3f} |"
                    )
            finally:
                server.terminate()
                server.wait(timeout=30)


if __name__ == "__main__":
    main()
