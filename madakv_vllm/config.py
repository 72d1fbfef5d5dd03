"""The eviction config: one place that parses and validates it, whatever its source (CLI flags,
YAML presets in configs/, per-request `vllm_xargs`, Python). No vLLM here.

    policy: madakv          # none | madakv | snapkv | pyramidkv | h2o | streamingllm | lookm
    budget: 0.2             # ratio of the prompt in (0, 1], or an integer token count
    window: 8               # proxy window, kept and counted inside the budget (default: the
                            # policy's own, 8 for madakv, 32 for the others)
    theta: 0.9              # any other key is an option of the policy (see its class)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .policies import POLICY_NAMES, EvictionPolicy, budget_error, make_policy


class EvictionConfigError(ValueError):
    """A bad eviction setting; the message says what to change."""


def parse_budget(value: Any) -> float | int:
    """A budget from a flag or file: "0.2" -> ratio 0.2, "512" -> 512 tokens, "1" or "1.0" -> ratio 1.0."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text) if ("." in text or "e" in text.lower()) else int(text)
        except ValueError:
            raise EvictionConfigError(f"budget must be a ratio in (0, 1] or a token count, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool) and value == 1:
        value = 1.0  # "1" means the whole prompt, not one token
    if (err := budget_error(value)) is not None:
        raise EvictionConfigError(err)
    return value


@dataclass(frozen=True)
class EvictionConfig:
    policy: str = "none"
    budget: float | int = 0.2
    window: int | None = None  # None: the policy's own default
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.policy not in POLICY_NAMES:
            raise EvictionConfigError(f"unknown eviction policy {self.policy!r}; "
                                      f"choose one of {', '.join(POLICY_NAMES)}")
        object.__setattr__(self, "budget", parse_budget(self.budget))
        if self.options.get("decode_budget") is not None:  # flags and vllm_xargs may send "256" or "0.1"
            try:
                decode_budget = parse_budget(self.options["decode_budget"])
            except EvictionConfigError as exc:
                raise EvictionConfigError(f"decode_{exc}") from None
            object.__setattr__(self, "options", {**self.options, "decode_budget": decode_budget})
        self.build_policy()  # validates window and options now, not at the first request

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "eviction config") -> "EvictionConfig":
        if not isinstance(data, Mapping):
            raise EvictionConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        data = dict(data)
        known = {k: data.pop(k) for k in ("policy", "budget", "window") if k in data}
        try:
            return cls(**known, options=data)
        except (EvictionConfigError, ValueError, TypeError) as exc:
            raise EvictionConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EvictionConfig":
        """A YAML file, or a bundled preset by name (`madakv-20`)."""
        import yaml

        path = resolve_preset(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise EvictionConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        return cls.from_mapping(data, source=str(path))

    def merged(self, **overrides) -> "EvictionConfig":
        """A copy with some settings replaced (None values are ignored); unknown keys are options."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        options = dict(self.options)
        for key, value in overrides.items():
            (base if key in base else options)[key] = value
        if base["policy"] != self.policy:  # options belong to a policy; budget and a set window stay
            options = {k: v for k, v in options.items() if k in overrides}
        return EvictionConfig.from_mapping({**base, **options})

    def as_mapping(self) -> dict[str, Any]:
        """The settings as `from_mapping` reads them; an unset window is left out (the policy's own)."""
        known = {"policy": self.policy, "budget": self.budget, "window": self.window}
        return {**{k: v for k, v in known.items() if v is not None}, **self.options}

    def build_policy(self) -> EvictionPolicy | None:
        if self.policy == "none":
            return None
        settings = self.as_mapping()
        try:
            return make_policy(settings.pop("policy"), **settings)
        except (ValueError, TypeError) as exc:
            raise EvictionConfigError(str(exc)) from None


def _presets_dir() -> Path:
    here = Path(__file__).resolve().parent
    bundled = here / "presets"  # where a wheel carries configs/ (setup.py)
    return bundled if bundled.is_dir() else here.parent / "configs"  # source tree, editable install


PRESETS_DIR = _presets_dir()


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def resolve_preset(value: str | Path) -> Path:
    """A YAML file path, or the name of a bundled preset ("madakv-20")."""
    path = Path(value)
    if path.is_file():
        return path
    bundled = PRESETS_DIR / f"{value}.yaml"
    if bundled.is_file():
        return bundled
    raise EvictionConfigError(f"eviction config {value!s} is neither a file nor a preset; presets: "
                              f"{', '.join(preset_names())}")
