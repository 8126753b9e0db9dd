"""The models: parts first (``attention``, ``packing``, ``layers``, ``embeddings``, ``head``, ``inputs``), then the
vision tower (``model``), the text tower (``text``), the image-text model (``joint``), and what trains them
(``loss``, ``lora``); ``recipes`` (each VLM's feature recipe) and ``flops``.

Imports: the base modules, ``checkpoints``, ``data`` and ``adapters`` (a recipe names its projector's config); never
``export``, ``pipeline``, ``serve``, ``integrations`` or ``cli``."""
