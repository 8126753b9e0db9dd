"""Jobs over many inputs: ``extract`` (folders, file lists, tar shards and videos to feature shards, resumable),
``store`` (the output folder and reading it back), ``retrieval`` (exact search), ``faiss_index`` (approximate
search), ``index_ready`` (clip-retrieval's file layout) and ``distributed`` (ranks under torchrun).

Imports: ``models``, ``export``, ``data`` and below; never ``serve``, ``integrations`` or ``cli``."""
