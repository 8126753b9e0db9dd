"""Evaluation: the numbers users measure, the way the SigLIP papers' evaluators measure them. ``datasets``
(labelled image sets and their fingerprints), ``prompts`` (named template sets), ``zeroshot`` (zero-shot
classification accuracy); each task returns a JSON-ready result with its model, data fingerprint, settings and
versions (``siglip2-encoder eval``).

Imports: ``pipeline`` and below (image features go through ``extract``'s folders); never ``integrations``,
``serve`` or ``cli``."""
