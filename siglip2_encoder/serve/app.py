"""An HTTP service around one loaded model (FastAPI + uvicorn): image and text embeddings, zero-shot scores, and
search over an extracted folder, with requests that arrive together batched into one forward pass.

    siglip2-encoder serve google/siglip2-base-patch16-224 --features features/ --port 8000

Endpoints: ``GET /health`` (the process answers), ``GET /ready`` (the model is loaded), ``POST /embed/image`` (the
image's bytes as the body), ``POST /embed/text`` (``{"texts": [...]}``), ``POST /classify?labels=cat&labels=dog``
(image bytes), ``GET /search?q=a+red+car&k=5``, and ``GET /``: a search page (a text box, a grid of the nearest
images, each served by ``GET /image?path=...`` for the folder's own rows only). The server fetches no URLs: images
come in the request. A body that is no image is a 400 naming why, never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel

from ..checkpoints.families import IMAGE_TEXT_TYPES
from ..data.images import ImageLoadError, load_image_bytes
from ..data.processor import ImageProcessor
from ..data.tokenizer import TextTokenizer
from ..models.joint import SigLIP2Model
from ..models.model import SigLIP2Encoder
from ..pipeline.retrieval import top_k
from ..pipeline.store import ExtractedFeatures

__all__ = ["Batcher", "Service", "create_app"]

logger = logging.getLogger(__name__)


class Batcher:
    """Dynamic batching: items submitted while a batch is open (up to ``max_batch``, for at most ``max_wait``
    seconds after its first) run together through ``run`` in a worker thread, which keeps the event loop free."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], max_batch: int = 32, max_wait: float = 0.005) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait >= 0, got {max_batch}, {max_wait}")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future]] | None = None
        self.batches = 0  # forward passes run, for tests and metrics

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            self.batches += 1
            try:
                results = await asyncio.to_thread(self.run, [item for item, _ in batch])
            except Exception as err:  # the batch failed as a whole: each request says so
                for _, future in batch:
                    future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)


@dataclass
class Service:
    """What the endpoints use: the model (image-text, or a vision tower alone), its processor and tokenizer, and the
    optional folder to search."""

    model: SigLIP2Model | SigLIP2Encoder
    processor: ImageProcessor
    tokenizer: TextTokenizer | None = None
    features: ExtractedFeatures | None = None
    name: str = ""
    _bank: tuple[list[str], torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def load(cls, model: str | os.PathLike, features: str | os.PathLike | None = None) -> Service:
        """An image-text checkpoint (with its tokenizer) or a vision-only one, loaded once."""
        from ..checkpoints.hub import CheckpointSource

        config = CheckpointSource(model).read_json("config.json") or {}
        if config.get("model_type") in IMAGE_TEXT_TYPES:
            loaded: SigLIP2Model | SigLIP2Encoder = SigLIP2Model.from_pretrained(model)
            tokenizer = TextTokenizer.from_pretrained(model)
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

    def bank(self) -> tuple[list[str], torch.Tensor]:
        if self.features is None:
            raise HTTPException(400, "the server was started without --features: there is nothing to search")
        if self._bank is None:
            self._bank = self.features.pooled()
        return self._bank


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


class Texts(BaseModel):
    texts: list[str]


def _image(body: bytes) -> np.ndarray:
    try:
        return load_image_bytes(body, "the request body")
    except ImageLoadError as err:
        raise HTTPException(400, str(err)) from None


def create_app(service: Service, *, max_batch: int = 32, max_wait_ms: float = 5.0, batching: bool = True) -> FastAPI:
    """The FastAPI app serving ``service``; image embeddings go through a :class:`Batcher` (one image per pass
    when ``batching`` is False)."""
    batcher = Batcher(service.embed_images, max_batch if batching else 1, max_wait_ms / 1000 if batching else 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.queue = asyncio.Queue()
        task = asyncio.create_task(batcher.serve_forever())
        yield
        task.cancel()

    app = FastAPI(title="siglip2-encoder", lifespan=lifespan)
    app.state.batcher = batcher

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, Any]:
        return {"ready": True, "model": service.name, "text": service.tokenizer is not None}

    @app.post("/embed/image")
    async def embed_image(request: Request) -> dict[str, Any]:
        embedding = await batcher.submit(_image(await request.body()))
        return {"embedding": embedding, "dimension": len(embedding)}

    @app.post("/embed/text")
    async def embed_text(body: Texts) -> dict[str, Any]:
        if not body.texts:
            raise HTTPException(400, "texts is empty: give at least one text")
        return {"embeddings": (await asyncio.to_thread(service.embed_texts, body.texts)).tolist()}

    @app.post("/classify")
    async def classify(request: Request, labels: Annotated[list[str], Query()]) -> dict[str, Any]:
        image = _image(await request.body())
        if not isinstance(service.model, SigLIP2Model) or service.tokenizer is None:
            raise HTTPException(400, f"{service.name} is a vision-only checkpoint: zero-shot needs its text tower")
        scores = await asyncio.to_thread(service.model.classify, image, labels, tokenizer=service.tokenizer)
        return {"scores": scores[0]}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return SEARCH_PAGE

    @app.get("/image")
    async def image(path: str) -> FileResponse:
        names, _ = service.bank()
        if path not in set(names):  # only the folder's own images: never an arbitrary file of the server
            raise HTTPException(404, "not an image of the searched folder")
        if not os.path.isfile(path):  # a tar sample's key, a video frame or a moved file: nothing to send
            raise HTTPException(404, f"{path} is not a file on this server (a tar sample, a video frame, or moved)")
        return FileResponse(path)

    @app.get("/search")
    async def search(q: str, k: Annotated[int, Query(ge=1, le=1000)] = 5) -> dict[str, Any]:
        names, bank = service.bank()
        query = await asyncio.to_thread(service.embed_texts, [q])
        scores, index = top_k(F.normalize(query, dim=-1), bank, k)
        return {"results": [{"path": names[i], "score": float(s)} for s, i in zip(scores[0], index[0])]}

    return app
