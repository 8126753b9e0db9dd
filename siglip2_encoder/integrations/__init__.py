"""Hosts for the encoder: LLaVA-style language models (:mod:`.llava`, :mod:`.llava_export`) and dense-prediction
heads."""
