"""An HTTP service around one loaded model (FastAPI + uvicorn): image and text embeddings, zero-shot scores, and
search over an extracted folder, with requests that arrive together batched into one forward pass.

    siglip2-encoder serve --model google/siglip2-base-patch16-224 --features features/ --port 8000

Endpoints: ``GET /health`` (the process answers), ``GET /ready`` (200 once the model and the searched folder are
loaded and the batching loop runs; 503 with the reason otherwise), ``POST /embed/image`` (the image's bytes as the
body), ``POST /embed/text`` (``{"texts": [...]}``), ``POST /classify?labels=cat&labels=dog`` (image bytes),
``GET /search?q=a+red+car&k=5``, and ``GET /``: a search page (a text box, a grid of the nearest images, each served
by ``GET /image?path=...``: only regular files of the folder's own rows, inside the folder they were extracted
from). The server fetches no URLs: images come in the request. A body that is no image is a 400 naming why, never a
500; what one request may cost is bounded (:class:`ServiceLimits`: 413 for a body, image or text list over its
limit, without reading the rest); a client that hangs up costs one log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.requests import ClientDisconnect

from ..checkpoints.families import IMAGE_TEXT_TYPES
from ..config import check_positive_ints
from ..data.images import ImageLoadError, ImageTooLargeError, load_image_bytes
from ..data.processor import ImageProcessor
from ..data.tokenizer import TextTokenizer
from ..models.joint import SigLIP2Model
from ..models.model import SigLIP2Encoder
from ..pipeline.retrieval import top_k
from ..pipeline.store import ExtractedFeatures

__all__ = ["Bank", "Batcher", "Service", "ServiceLimits", "create_app"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may cost the server; each is a ``serve`` option.

    Attributes:
        max_body_bytes: an image body's size at most (``--max-body-mb``): a larger one is refused with 413 as soon
            as its declared or streamed size passes it, without reading the rest.
        max_pixels: an image's pixels at most (``--max-pixels``): decoded RGB needs 3 bytes per pixel.
        decode_workers: images decoded at once, in worker threads (``--decode-workers``): decoding never blocks the
            event loop, and memory is bounded by decode_workers x max_pixels x 3 bytes.
        request_timeout: seconds a request may take, reading its body included (``--request-timeout``): 408 while
            reading, 504 after.
        max_texts, max_text_chars: texts per ``/embed/text`` request and characters per text (``--max-texts``,
            ``--max-text-chars``).
    """

    max_body_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    decode_workers: int = 2
    request_timeout: float = 60.0
    max_texts: int = 256
    max_text_chars: int = 2000

    def __post_init__(self) -> None:
        check_positive_ints(self, "max_body_bytes", "max_pixels", "decode_workers", "max_texts", "max_text_chars")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got request_timeout={self.request_timeout!r}")


class Batcher:
    """Dynamic batching: items submitted while a batch is open (up to ``max_batch``, for at most ``max_wait``
    seconds after its first) run together through ``run`` in a worker thread, which keeps the event loop free.

    A request that is gone (its future cancelled: a timeout, a client that hung up) is dropped from its batch; a
    batch that fails fails each of its requests; :attr:`stopped` says why the loop ended, if it ever does."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], max_batch: int = 32, max_wait: float = 0.005) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait >= 0, got {max_batch}, {max_wait}")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future]] | None = None
        self.batches = 0  # forward passes run, for tests and metrics
        self.stopped: str | None = None  # why serve_forever ended (None while it runs)

    async def submit(self, item: Any) -> Any:
        if self.stopped is not None:
            raise HTTPException(503, f"the batching loop stopped ({self.stopped}); restart the server")
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch and (left := deadline - loop.time()) > 0:
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [(item, future) for item, future in batch if not future.done()]  # drop requests already gone

    async def serve_forever(self) -> None:
        try:
            while True:
                batch = await self._next_batch()
                if not batch:
                    continue
                self.batches += 1
                try:
                    results = await asyncio.to_thread(self.run, [item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"the model gave {len(results)} results for {len(batch)} inputs")
                except Exception as err:  # the batch failed as a whole: each request says so
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                for (_, future), result in zip(batch, results):
                    if not future.done():  # its request may have gone while the batch ran
                        future.set_result(result)
        except asyncio.CancelledError:
            self.stopped = "the server is shutting down"
            raise
        except BaseException as err:  # a bug in the loop itself: /ready says so from now on
            self.stopped = f"{type(err).__name__}: {err}"
            logger.error("the batching loop stopped: %s", self.stopped)
            raise


@dataclass
class Bank:
    """The searched folder's pooled features, loaded once, and where its images may be served from: rows' paths
    resolved against the extraction's working directory, inside the folder they were extracted from."""

    names: list[str]
    features: torch.Tensor
    files: dict[str, Path]  # row path -> the file it names, for rows whose path names one inside ``root``
    root: Path | None  # the real folder holding every row's file (None: no row names a file here)

    @classmethod
    def load(cls, store: ExtractedFeatures) -> Bank:
        names, features = store.pooled()
        base = store.working_dir
        # Relative paths need the extraction's working directory (folders written before 0.2.0 lack it).
        files = {n: Path(os.path.abspath(base / n if base else n)) for n in names if base or os.path.isabs(n)}
        try:
            root = Path(os.path.commonpath([f.parent for f in files.values()])).resolve() if files else None
        except ValueError:  # paths on different drives
            root = None
        return cls(names, features, files, root)

    def file(self, path: str) -> Path:
        """The regular file a row names, resolved inside the folder the rows came from; 404 for anything else."""
        if path not in self.files or self.root is None:
            known = path in set(self.names)
            raise HTTPException(404, "not a file this server serves" if known else "not an image of the folder")
        real = self.files[path].resolve()
        if not (real.is_relative_to(self.root) and real.is_file()):  # a symlink out of the folder, moved, a dir
            raise HTTPException(404, "not a file this server serves")
        return real


@dataclass
class Service:
    """What the endpoints use: the model (image-text, or a vision tower alone), its processor and tokenizer, and the
    optional folder to search."""

    model: SigLIP2Model | SigLIP2Encoder
    processor: ImageProcessor
    tokenizer: TextTokenizer | None = None
    features: ExtractedFeatures | None = None
    name: str = ""

    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        features: str | os.PathLike | None = None,
        *,
        text_preprocessing: str | None = None,
    ) -> Service:
        """An image-text checkpoint (with its tokenizer) or a vision-only one, loaded once. ``text_preprocessing``
        is for free text (``/embed/text``, ``/search``; None: the checkpoint family's default); ``/classify``
        canonicalises labels as the papers' zero-shot evaluator does."""
        from ..checkpoints.hub import CheckpointSource

        config = CheckpointSource(model).read_json("config.json") or {}
        if config.get("model_type") in IMAGE_TEXT_TYPES:
            loaded: SigLIP2Model | SigLIP2Encoder = SigLIP2Model.from_pretrained(model)
            tokenizer = TextTokenizer.from_pretrained(model)
            if text_preprocessing is not None:
                tokenizer = TextTokenizer.from_preprocessing(tokenizer.tokenizer, text_preprocessing)
        else:
            loaded, tokenizer = SigLIP2Encoder.from_pretrained(model), None
        store = ExtractedFeatures.open(features) if features is not None else None
        return cls(loaded, ImageProcessor.from_pretrained(model), tokenizer, store, str(model))

    @property
    def tower(self) -> SigLIP2Encoder:
        return self.model.vision_model if isinstance(self.model, SigLIP2Model) else self.model

    def embed_images(self, images: list[np.ndarray]) -> list[list[float]]:
        inputs = self.processor(images).to(self.tower.device, self.tower.dtype)
        with torch.inference_mode():
            features = self.tower(**inputs, return_last=False).pooler_output
        return features.float().cpu().tolist()

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise HTTPException(400, f"{self.name} is a vision-only checkpoint: it has no text tower")
        tokens = self.tokenizer(list(texts))
        mask = None if tokens.attention_mask is None else tokens.attention_mask.to(self.model.device)
        with torch.inference_mode():
            return self.model.get_text_features(tokens.input_ids.to(self.model.device), mask).float().cpu()


SEARCH_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>siglip2-encoder search</title>
<style>
body { font-family: sans-serif; margin: 2rem; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, 180px); gap: 12px; margin-top: 1rem; }
figure { margin: 0; } img { width: 180px; height: 180px; object-fit: cover; background: #eee; }
figcaption { font-size: 12px; overflow-wrap: anywhere; }
</style></head>
<body>
<h1>Search images by text</h1>
<form id="form"><input id="query" name="q" size="40" placeholder="a photo of a red car" autofocus>
<input id="k" name="k" type="number" value="8" min="1" max="100"> <button id="go" type="submit">Search</button></form>
<p id="status"></p><div id="grid"></div>
<script>
document.getElementById("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const q = document.getElementById("query").value, k = document.getElementById("k").value;
  const status = document.getElementById("status"), grid = document.getElementById("grid");
  status.textContent = "searching...";
  const response = await fetch(`/search?q=${encodeURIComponent(q)}&k=${k}`);
  const body = await response.json();
  if (!response.ok) { status.textContent = body.detail; return; }
  grid.replaceChildren(...body.results.map((r) => {
    const figure = document.createElement("figure"), img = document.createElement("img");
    img.src = `/image?path=${encodeURIComponent(r.path)}`; img.alt = r.path;
    const caption = document.createElement("figcaption");
    caption.textContent = `${r.score.toFixed(3)}  ${r.path}`;
    figure.append(img, caption); figure.className = "result"; return figure;
  }));
  status.textContent = `${body.results.length} results for "${q}"`;
});
</script></body></html>
"""


class _Gone(Exception):
    """The client hung up while sending its request: there is no one to answer."""


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as its declared or streamed size passes ``limit`` (the rest is
    not read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(
            413, f"the body is {int(declared)} bytes; this server takes at most {limit} (--max-body-mb)"
        )
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"the body passed {limit} bytes, the most this server takes (--max-body-mb)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise _Gone from None
    return b"".join(chunks)


def _texts(body: bytes, limits: ServiceLimits) -> list[str]:
    """``{"texts": [...]}`` checked against the limits; errors name the problem, never echo the input."""
    try:
        texts = json.loads(body)["texts"]
    except (ValueError, TypeError, KeyError):
        raise HTTPException(422, 'the body must be JSON {"texts": ["a text", ...]}') from None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise HTTPException(422, '"texts" must be a list of strings')
    if not texts:
        raise HTTPException(400, "texts is empty: give at least one text")
    if len(texts) > limits.max_texts:
        raise HTTPException(413, f"{len(texts)} texts; this server takes at most {limits.max_texts} (--max-texts)")
    longest = max(range(len(texts)), key=lambda i: len(texts[i]))
    if len(texts[longest]) > limits.max_text_chars:
        raise HTTPException(
            413,
            f"text {longest} has {len(texts[longest])} characters; this server takes at most {limits.max_text_chars} "
            f"(--max-text-chars)",
        )
    return texts


async def _gone(request: Request, _: Exception) -> Response:
    logger.info("%s %s: the client hung up while sending its request", request.method, request.url.path)
    return Response(status_code=499)  # nginx's "client closed request"; no one reads it


async def _invalid(request: Request, err: Exception) -> JSONResponse:
    problems = [{"loc": e.get("loc"), "msg": e.get("msg")} for e in err.errors()]  # without the input's echo
    return JSONResponse({"detail": problems}, status_code=422)


class _Endpoints:
    """The routes of one app: what each does with the service, within the limits."""

    def __init__(self, app: FastAPI, service: Service, batcher: Batcher, limits: ServiceLimits) -> None:
        self.app, self.service, self.batcher, self.limits = app, service, batcher, limits
        self.decoding = asyncio.Semaphore(limits.decode_workers)

    async def timed(self, awaitable: Awaitable[Any], status: int, what: str) -> Any:
        timeout = self.limits.request_timeout
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except asyncio.TimeoutError:
            raise HTTPException(status, f"{what} took over {timeout:g} s (--request-timeout)") from None

    async def body(self, request: Request) -> bytes:
        return await self.timed(_read_body(request, self.limits.max_body_bytes), 408, "sending the body")

    async def image_of(self, request: Request) -> np.ndarray:
        """The request body's image, decoded in a worker thread (at most ``decode_workers`` at once)."""
        body = await self.body(request)
        async with self.decoding:
            try:
                return await asyncio.to_thread(
                    load_image_bytes, body, "the request body", max_pixels=self.limits.max_pixels
                )
            except ImageTooLargeError as err:
                raise HTTPException(413, f"{err} (this server's --max-pixels)") from None
            except ImageLoadError as err:
                raise HTTPException(400, str(err)) from None

    async def bank(self) -> Bank:
        task = self.app.state.bank
        if task is None:
            raise HTTPException(400, "the server was started without --features: there is nothing to search")
        try:
            return await asyncio.shield(task)
        except Exception as err:  # the folder could not be read: say so on every search
            raise HTTPException(503, f"the features could not be loaded: {err}") from None

    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def ready(self) -> JSONResponse:
        task, reason = self.app.state.bank, None
        if self.batcher.stopped is not None:
            reason = f"the batching loop stopped ({self.batcher.stopped})"
        elif task is not None and not task.done():
            reason = "loading the features to search"
        elif task is not None and task.exception() is not None:
            reason = f"the features could not be loaded: {task.exception()}"
        if reason is not None:
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        tokenizer = self.service.tokenizer
        return JSONResponse(
            {
                "ready": True,
                "model": self.service.name,
                "text": tokenizer is not None,
                "text_preprocessing": None if tokenizer is None else tokenizer.preprocessing,
            }
        )

    async def embed_image(self, request: Request) -> dict[str, Any]:
        image = await self.image_of(request)
        embedding = await self.timed(self.batcher.submit(image), 504, "embedding the image")
        return {"embedding": embedding, "dimension": len(embedding)}

    async def embed_text(self, request: Request) -> dict[str, Any]:
        texts = _texts(await self.body(request), self.limits)
        return {"embeddings": (await asyncio.to_thread(self.service.embed_texts, texts)).tolist()}

    async def classify(self, request: Request, labels: Annotated[list[str], Query()]) -> dict[str, Any]:
        image, service = await self.image_of(request), self.service
        if not isinstance(service.model, SigLIP2Model) or service.tokenizer is None:
            raise HTTPException(400, f"{service.name} is a vision-only checkpoint: zero-shot needs its text tower")
        scores = await asyncio.to_thread(service.model.classify, image, labels, tokenizer=service.tokenizer)
        return {"scores": scores[0]}

    async def page(self) -> str:
        return SEARCH_PAGE

    async def image(self, path: str) -> FileResponse:
        return FileResponse((await self.bank()).file(path))

    async def search(self, q: str, k: Annotated[int, Query(ge=1, le=1000)] = 5) -> dict[str, Any]:
        searched = await self.bank()
        query = await asyncio.to_thread(self.service.embed_texts, [q])
        scores, index = top_k(F.normalize(query, dim=-1), searched.features, k)
        return {"results": [{"path": searched.names[i], "score": float(s)} for s, i in zip(scores[0], index[0])]}


def create_app(
    service: Service,
    *,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    batching: bool = True,
    limits: ServiceLimits = ServiceLimits(),
) -> FastAPI:
    """The FastAPI app serving ``service``; image embeddings go through a :class:`Batcher` (one image per pass
    when ``batching`` is False); ``limits`` bound what one request may cost."""
    batcher = Batcher(service.embed_images, max_batch if batching else 1, max_wait_ms / 1000 if batching else 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.queue = asyncio.Queue()
        task = asyncio.create_task(batcher.serve_forever())
        if service.features is not None:  # loaded in a thread: the server answers /health meanwhile
            app.state.bank = asyncio.create_task(asyncio.to_thread(Bank.load, service.features))
        yield
        task.cancel()

    app = FastAPI(title="siglip2-encoder", lifespan=lifespan)
    app.state.batcher, app.state.bank = batcher, None
    app.add_exception_handler(_Gone, _gone)
    app.add_exception_handler(RequestValidationError, _invalid)
    routes = _Endpoints(app, service, batcher, limits)
    app.get("/health")(routes.health)
    app.get("/ready")(routes.ready)
    app.post("/embed/image")(routes.embed_image)
    app.post("/embed/text")(routes.embed_text)
    app.post("/classify")(routes.classify)
    app.get("/", response_class=HTMLResponse)(routes.page)
    app.get("/image")(routes.image)
    app.get("/search")(routes.search)
    return app
