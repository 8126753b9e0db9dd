"""Checkpoints: where weights come from and go to. ``hub`` (a Hub id or folder, the offline cache, clear errors),
``convert`` (transformers' configs, processors and key names, timm, big_vision, strict loading, writing folders
transformers loads) and ``publish`` (Hub model cards and uploads).

Imports: the base modules (``config``, ``presets``, ``output``, ``files``) only; never the model classes, which use
it (a conversion is a pure function of configs and state dicts)."""
