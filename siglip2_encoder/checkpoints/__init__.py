"""Checkpoints: where weights come from and go to. ``hub`` (a Hub id or folder, the offline cache, clear errors),
one module per foreign format - ``families`` (the transformers model types and image processors that hold a SigLIP
tower, as tables), ``hf_format`` (transformers' configs, processor settings and key names), ``timm_format``,
``big_vision`` - then ``strict`` (the one strict loading check), ``folders`` (whole checkpoints read from a source
and folders written for transformers) and ``publish`` (Hub model cards and uploads).

Imports: the base modules (``config``, ``presets``, ``output``, ``files``) only; never the model classes, which use
it (a conversion is a pure function of configs and state dicts)."""
