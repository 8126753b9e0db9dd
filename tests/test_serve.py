"""The HTTP service, through its ASGI app (httpx, in process): each endpoint's numbers equal the library's own calls
on the same model and inputs; requests arriving together share one forward pass; bad images are 400s."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from siglip2_encoder import SigLIP2Model, TextTokenizer
from siglip2_encoder.cli import EXIT_OK, main
from siglip2_encoder.serve.app import Service, create_app


def png(seed: int, size=(40, 56)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def service(zero_shot_dir, photos, tmp_path_factory) -> Service:
    out = tmp_path_factory.mktemp("served") / "features"
    folder = str(photos[0]).rsplit("/", 1)[0]
    assert main(["-q", "extract", folder, "--model", str(zero_shot_dir), "-o", str(out)]) == EXIT_OK
    return Service.load(zero_shot_dir, out)


def call(service: Service, requests, **options):
    """Send ``requests`` ((method, url, kwargs) each) at once to a running app; their responses and the app."""
    app = create_app(service, **options)

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await asyncio.gather(*(client.request(m, url, **kw) for m, url, kw in requests))

    return asyncio.run(go()), app


def test_health_ready_and_embeddings_equal_the_library(service, zero_shot_dir):
    images = [png(i) for i in range(6)]
    (health, ready, *embedded, texts), app = call(
        service,
        [("GET", "/health", {}), ("GET", "/ready", {})]
        + [("POST", "/embed/image", {"content": body}) for body in images]
        + [("POST", "/embed/text", {"json": {"texts": ["a dog", "a red car"]}})],
    )
    assert health.json() == {"status": "ok"} and ready.json()["ready"] and ready.json()["text"]
    model = SigLIP2Model.from_pretrained(zero_shot_dir)
    pixels = service.processor([np.array(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    with torch.no_grad():
        want = model.get_image_features(**pixels)
    got = torch.tensor([r.json()["embedding"] for r in embedded])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert app.state.batcher.batches < len(images)  # requests that arrived together shared forward passes
    tokens = TextTokenizer.from_pretrained(zero_shot_dir)(["a dog", "a red car"])
    with torch.no_grad():
        want_text = model.get_text_features(tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(torch.tensor(texts.json()["embeddings"]), want_text, atol=1e-5, rtol=0)


def test_without_batching_each_image_is_its_own_pass(service):
    responses, app = call(service, [("POST", "/embed/image", {"content": png(i)}) for i in range(4)], batching=False)
    assert all(r.status_code == 200 for r in responses) and app.state.batcher.batches == 4


def test_classify_and_search_equal_the_library(service, zero_shot_dir, photos):
    labels = ["a dog", "a red car", "an apple tree"]
    (classified, searched), _ = call(
        service,
        [
            ("POST", "/classify", {"content": png(7), "params": {"labels": labels}}),
            ("GET", "/search", {"params": {"q": "a red car", "k": 3}}),
        ],
    )
    model, tokenizer = SigLIP2Model.from_pretrained(zero_shot_dir), TextTokenizer.from_pretrained(zero_shot_dir)
    want = model.classify(np.array(Image.open(io.BytesIO(png(7))).convert("RGB")), labels, tokenizer=tokenizer)[0]
    got = classified.json()["scores"]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-5)
    names, bank = service.features.pooled()
    query = torch.nn.functional.normalize(service.embed_texts(["a red car"]), dim=-1)
    expected = (query @ torch.nn.functional.normalize(bank, dim=-1).T)[0].topk(3)
    assert [r["path"] for r in searched.json()["results"]] == [names[i] for i in expected.indices]


def test_bad_requests_are_4xx_with_the_reason(service):
    (not_image, empty, no_texts, bad_k), _ = call(
        service,
        [
            ("POST", "/embed/image", {"content": b"not an image"}),
            ("POST", "/embed/image", {"content": b""}),
            ("POST", "/embed/text", {"json": {"texts": []}}),
            ("GET", "/search", {"params": {"q": "x", "k": 0}}),
        ],
    )
    assert not_image.status_code == 400 and not_image.json()["detail"].startswith("the request body: not an image")
    assert empty.status_code == 400 and empty.json()["detail"] == "the request body: the image is empty (0 bytes)"
    assert no_texts.status_code == 400 and no_texts.json()["detail"] == "texts is empty: give at least one text"
    assert bad_k.status_code == 422


def test_the_serve_command_answers_on_loopback(zero_shot_dir):
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "siglip2_encoder.cli",
        "-q",
        "serve",
        "--model",
        str(zero_shot_dir),
        "--port",
        str(port),
    ]
    server = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        response = httpx.post(f"http://127.0.0.1:{port}/embed/image", content=png(3), timeout=30)
        assert response.status_code == 200 and response.json()["dimension"] == 32
    finally:
        server.terminate()
        server.wait(timeout=30)
