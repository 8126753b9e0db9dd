"""`siglip2-encoder serve` under faults, as a process on 127.0.0.1, with bounded request loops: clients that hang
up, oversized bodies, a large image decoding while others ask, a symlinked row, and concurrent mixed requests."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import free_port, wait_until_ready
from PIL import Image

from siglip2_encoder import SigLIP2Model, TextTokenizer
from siglip2_encoder.cli import main

pytestmark = pytest.mark.slow


def png(seed: int, size=(40, 56)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def server(zero_shot_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        (folder / f"p{i}.png").write_bytes(png(i))
    assert main(["-q", "extract", str(folder), "--model", str(zero_shot_dir), "-o", str(tmp_path / "features")]) == 0
    port = free_port()
    command = [sys.executable, "-m", "siglip2_encoder.cli", "serve", "--model", str(zero_shot_dir), "--port", str(port)]
    command += ["--features", str(tmp_path / "features"), "--max-body-mb", "2", "--request-timeout", "20"]
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=log)
    wait_until_ready(f"http://127.0.0.1:{port}/ready", process, (tmp_path / "server.log").read_text)
    yield port, process, tmp_path
    process.terminate()
    process.wait(timeout=30)
    log.close()


def request_head(port: int, length: int, path: str = "/embed/image") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def hang_up(port: int, kind: str) -> None:
    """A client that goes away while sending its body: after part of it, after the headers, or with a reset."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request_head(port, 100_000))
        if kind != "headers only":
            sock.sendall(png(1)[:500])
        if kind == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        time.sleep(0.01)


def oversized(port: int, declared: bool) -> str:
    """Send a 200 MB body (declared, or streamed chunked) until the server answers; its status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if declared:
            sock.sendall(request_head(port, 200 * 2**20))
        else:
            sock.sendall(
                f"POST /embed/image HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()  # noqa: F541
            )
        chunk = b"\0" * 2**20
        sock.setblocking(False)
        answer, sent = b"", 0
        deadline = time.monotonic() + 20
        while b"\r\n" not in answer and time.monotonic() < deadline:
            try:
                answer += sock.recv(4096)
            except BlockingIOError:
                pass
            if sent < 200 and b"\r\n" not in answer:
                try:
                    sock.sendall(chunk if declared else b"100000\r\n" + chunk + b"\r\n")
                    sent += 1
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    time.sleep(0.01)
            else:
                time.sleep(0.01)
        return answer.split(b"\r\n")[0].decode()


def test_the_service_survives_its_clients(server, zero_shot_dir):
    port, process, tmp_path = server
    url = f"http://127.0.0.1:{port}"

    # ~100 clients hang up while sending: at most one log line each, no traceback, the service goes on.
    started = time.monotonic()
    for i in range(99):
        hang_up(port, ("partial body", "headers only", "reset")[i % 3])
        assert time.monotonic() - started < 60
    assert httpx.post(f"{url}/embed/image", content=png(5), timeout=30).status_code == 200  # the batcher is alive

    # Oversized bodies: 413 before the rest is read, and the server's memory stays put.
    before = rss_mb(process.pid)
    assert oversized(port, declared=True).startswith("HTTP/1.1 413")
    assert oversized(port, declared=False).startswith("HTTP/1.1 413")
    assert rss_mb(process.pid) - before < 50

    # A large image decodes in a worker: /health answers within a second meanwhile.
    big = io.BytesIO()
    Image.new("RGB", (6000, 6000), (200, 30, 30)).save(big, "PNG")  # 36 Mpx, under the 40 Mpx default
    result: dict[str, int] = {}
    thread = threading.Thread(
        target=lambda: result.update(
            code=httpx.post(f"{url}/embed/image", content=big.getvalue(), timeout=60).status_code
        )
    )
    thread.start()
    waits = []
    while thread.is_alive() and len(waits) < 100:
        start = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        waits.append(time.monotonic() - start)
        time.sleep(0.02)
    thread.join(60)
    assert result["code"] == 200 and max(waits) < 1.0, waits

    # A row whose file became a symlink to a file outside the folder: 404, none of its bytes.
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(99))
    row = str(tmp_path / "photos" / "p1.png")
    os.unlink(row)
    os.symlink(secret, row)
    linked = httpx.get(f"{url}/image", params={"path": row}, timeout=10)
    assert linked.status_code == 404 and png(99) not in linked.content
    assert httpx.get(f"{url}/image", params={"path": str(tmp_path / "photos" / "p0.png")}).content == png(0)

    # Concurrent mixed requests give the library's own numbers.
    model, tokenizer = SigLIP2Model.from_pretrained(zero_shot_dir), TextTokenizer.from_pretrained(zero_shot_dir)
    processor_images = [np.array(Image.open(io.BytesIO(png(10 + i))).convert("RGB")) for i in range(6)]
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(lambda i: httpx.post(f"{url}/embed/image", content=png(10 + i), timeout=30), range(6)))
        texts = pool.submit(httpx.post, f"{url}/embed/text", json={"texts": ["a dog", "a red car"]}, timeout=30)
        labels = pool.submit(
            httpx.post, f"{url}/classify", content=png(10), params={"labels": ["a dog", "a car"]}, timeout=30
        )
    from siglip2_encoder import ImageProcessor

    pixels = ImageProcessor.from_pretrained(zero_shot_dir)(processor_images)
    with torch.no_grad():
        want = model.get_image_features(**pixels)
        tokens = tokenizer(["a dog", "a red car"])
        want_text = model.get_text_features(tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(torch.tensor([r.json()["embedding"] for r in images]), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(texts.result().json()["embeddings"]), want_text, atol=1e-5, rtol=0)
    want_labels = model.classify(processor_images[0], ["a dog", "a car"], tokenizer=tokenizer)[0]
    assert [r["label"] for r in labels.result().json()["scores"]] == [r["label"] for r in want_labels]

    process.terminate()
    process.wait(timeout=30)
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert 0 < log.count("the client hung up while sending its request") <= 99  # seen, one line each at most
