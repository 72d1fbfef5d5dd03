"""Eviction policies: scores and modality tags in, per-head keep indices out (no vLLM here)."""
from __future__ import annotations

import dataclasses

from .base import EvictionPolicy, budget_error
from .h2o import H2O
from .lookm import LookM
from .madakv import MadaKV
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streamingllm import StreamingLLM

POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (MadaKV, SnapKV, PyramidKV, H2O, StreamingLLM, LookM)
}
POLICY_NAMES = ("none", *POLICIES)


def make_policy(name: str, **options) -> EvictionPolicy | None:
    """The policy called `name` with its options (None for "none"); unknown names or options
    raise ValueError naming what is allowed."""
    if name == "none":
        return None
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    cls = POLICIES[name]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return cls(**options)


__all__ = ["EvictionPolicy", "MadaKV", "SnapKV", "PyramidKV", "H2O", "StreamingLLM", "LookM",
           "POLICIES", "POLICY_NAMES", "make_policy", "budget_error"]
