"""Test and demo helpers: tiny random multimodal models built offline (no vLLM import)."""
