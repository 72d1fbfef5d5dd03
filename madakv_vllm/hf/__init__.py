"""HF transformers reference path (no vLLM): evict the KV cache right after prefill."""
from .reference import EvictionReport, generate_sweep, generate_with_eviction, modality_tags

__all__ = ["EvictionReport", "generate_sweep", "generate_with_eviction", "modality_tags"]
