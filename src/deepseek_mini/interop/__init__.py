"""Weights from and to other tools: SmolLM2 (warm start) and transformers."""
