"""The HTTP service, through its ASGI app (httpx, in process): each endpoint's numbers equal the library's own calls
on the same model and inputs; requests arriving together share one forward pass; bad images are 400s."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
import torch
from conftest import free_port, wait_until_ready
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
            if app.state.bank is not None:  # ready once the searched folder is loaded, as /ready says
                await app.state.bank
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
    import subprocess
    import sys

    port = free_port()
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
        wait_until_ready(f"http://127.0.0.1:{port}/ready", server, lambda: server.stderr.read().decode())
        response = httpx.post(f"http://127.0.0.1:{port}/embed/image", content=png(3), timeout=30)
        assert response.status_code == 200 and response.json()["dimension"] == 32
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---------------------------------------------------------------------------------------------- limits and faults


def test_bodies_images_and_texts_over_the_limits_are_413_without_echo(service):
    from siglip2_encoder.serve.app import ServiceLimits

    limits = ServiceLimits(max_body_bytes=50_000, max_pixels=100 * 100, max_texts=3, max_text_chars=20)

    async def chunks():  # a streamed body without a declared size
        for _ in range(100):
            yield b"x" * 1000

    big = png(1, (120, 120))
    secret = "do not echo me " * 3
    responses, _ = call(
        service,
        [
            ("POST", "/embed/image", {"content": b"x" * 60_000}),
            ("POST", "/embed/image", {"content": chunks()}),
            ("POST", "/embed/image", {"content": big}),
            ("POST", "/embed/text", {"json": {"texts": ["a", "b", "c", "d"]}}),
            ("POST", "/embed/text", {"json": {"texts": ["a", secret]}}),
            ("POST", "/embed/text", {"content": b'{"texts": "' + secret.encode() + b'"}'}),
            ("GET", "/search", {"params": {"q": secret, "k": 0}}),
            ("POST", "/embed/image", {"content": png(2)}),
        ],
        limits=limits,
    )
    declared, streamed, pixels, many, long, not_list, bad_k, fine = responses
    assert declared.status_code == 413
    assert declared.json()["detail"] == "the body is 60000 bytes; this server takes at most 50000 (--max-body-mb)"
    assert streamed.status_code == 413
    assert streamed.json()["detail"] == "the body passed 50000 bytes, the most this server takes (--max-body-mb)"
    assert pixels.status_code == 413 and pixels.json()["detail"].startswith("the request body: 120x120 = 14400 pixels")
    assert pixels.json()["detail"].endswith("(this server's --max-pixels)")
    assert many.status_code == 413 and many.json()["detail"] == "4 texts; this server takes at most 3 (--max-texts)"
    assert long.json()["detail"] == "text 1 has 45 characters; this server takes at most 20 (--max-text-chars)"
    assert not_list.status_code == 422 and not_list.json()["detail"] == '"texts" must be a list of strings'
    assert bad_k.status_code == 422
    assert all("echo" not in r.text for r in responses)
    assert fine.status_code == 200


def test_the_batcher_drops_requests_that_are_gone_and_survives_a_bad_batch():
    from siglip2_encoder.serve.app import Batcher

    calls = []

    def run(items):
        calls.append(list(items))
        if "short" in items:
            return items[:-1]  # fewer results than inputs: every request of the batch fails, the loop goes on
        return [f"<{item}>" for item in items]

    async def go():
        batcher = Batcher(run, max_batch=8, max_wait=0.05)
        batcher.queue = asyncio.Queue()
        loop = asyncio.create_task(batcher.serve_forever())
        gone = asyncio.create_task(batcher.submit("gone"))
        await asyncio.sleep(0)  # queued
        gone.cancel()  # its client left before the batch ran
        kept = await batcher.submit("kept")
        short = await asyncio.gather(batcher.submit("a"), batcher.submit("short"), return_exceptions=True)
        after = await batcher.submit("after")
        loop.cancel()
        return kept, short, after, batcher

    kept, short, after, batcher = asyncio.run(go())
    assert (kept, after) == ("<kept>", "<after>") and calls[0] == ["kept"]
    assert [str(e) for e in short] == ["the model gave 1 results for 2 inputs"] * 2
    assert batcher.stopped == "the server is shutting down"


def test_a_request_over_its_time_is_504_and_the_service_goes_on(service, monkeypatch):
    import time

    from siglip2_encoder.serve.app import ServiceLimits

    real, slow = service.embed_images, [True]

    def embed(images):
        if slow.pop() if slow else False:
            time.sleep(0.6)  # the first batch outlasts its request; its result comes back to no one
        return real(images)

    monkeypatch.setattr(service, "embed_images", embed)

    async def go():
        app = create_app(service, limits=ServiceLimits(request_timeout=0.3))
        async with app.router.lifespan_context(app):
            await app.state.bank
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                first = await client.post("/embed/image", content=png(1))
                await asyncio.sleep(0.5)  # the slow batch ends and finds its request gone
                second = await client.post("/embed/image", content=png(1))
                ready = await client.get("/ready")
        return first, second, ready

    first, second, ready = asyncio.run(go())
    assert (
        first.status_code == 504 and first.json()["detail"] == "embedding the image took over 0.3 s (--request-timeout)"
    )
    assert second.status_code == 200 and ready.status_code == 200


def test_ready_waits_for_the_searched_folder(service, monkeypatch):
    import threading

    from siglip2_encoder.serve import app as app_module

    release, real = threading.Event(), app_module.Bank.load
    monkeypatch.setattr(app_module.Bank, "load", lambda store: release.wait(10) and real(store))

    async def go():
        app = create_app(service)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                loading, health = await client.get("/ready"), await client.get("/health")
                release.set()
                await app.state.bank
                return loading, health, await client.get("/ready")

    loading, health, ready = asyncio.run(go())
    assert loading.status_code == 503 and loading.json() == {"ready": False, "reason": "loading the features to search"}
    assert health.status_code == 200 and ready.status_code == 200


def test_image_serves_only_regular_files_inside_the_extracted_folder(zero_shot_dir, tmp_path, monkeypatch):
    """Rows resolve against the extraction's working directory (not the server's), and a row whose file became a
    symlink to a file outside the folder is a 404, with none of that file's bytes."""
    folder = tmp_path / "work" / "photos"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(png(i))
    monkeypatch.chdir(tmp_path / "work")
    assert main(["-q", "extract", "photos", "--model", str(zero_shot_dir), "-o", str(tmp_path / "features")]) == 0
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(99))
    (folder / "p1.png").unlink()
    (folder / "p1.png").symlink_to(secret)
    monkeypatch.chdir(tmp_path)  # the server runs elsewhere
    responses, _ = call(
        Service.load(zero_shot_dir, tmp_path / "features"),
        [("GET", "/image", {"params": {"path": p}}) for p in ("photos/p0.png", "photos/p1.png", "/etc/passwd")],
    )
    good, linked, outside = responses
    assert good.status_code == 200 and good.content == png(0)
    assert linked.status_code == 404 and png(99) not in linked.content
    assert outside.status_code == 404 and outside.json()["detail"] == "not an image of the folder"
