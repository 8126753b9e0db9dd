"""Projectors from vision tokens to a language model's width (see the adapters issue)."""
