"""Evaluation: the numbers users measure, the way the SigLIP papers' evaluators measure them. ``datasets``
(labelled image sets and their fingerprints), ``prompts`` (named template sets), ``features`` (image features
through ``extract`` folders), ``zeroshot``, ``retrieval``, ``probe`` (linear probe, kNN), ``segmentation`` (the
dense linear probe); each task returns a JSON-ready result with its model, data fingerprint, settings and
versions (``siglip2-encoder eval``).

Imports: ``integrations`` (the dense heads) and below; image features go through ``extract``'s folders. Never
``serve`` or ``cli``."""
