"""``siglip2-encoder serve``: the HTTP service (``app``: FastAPI, dynamic batching, the search page).

Imports: ``pipeline``, ``models``, ``data`` and below; never ``cli``."""
