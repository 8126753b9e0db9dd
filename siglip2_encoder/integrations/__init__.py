"""Hosts for the encoder: LLaVA-style language models, dense-prediction heads (see the integrations issues)."""
