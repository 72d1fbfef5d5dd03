from pathlib import Path

import pytest

from madakv_vllm.config import PRESETS_DIR, EvictionConfig, EvictionConfigError, parse_budget
from madakv_vllm.policies import MadaKV


def test_parse_budget_forms():
    assert parse_budget("0.2") == 0.2 and isinstance(parse_budget("0.2"), float)
    assert parse_budget("512") == 512 and isinstance(parse_budget("512"), int)
    assert parse_budget("1") == 1.0 and isinstance(parse_budget("1"), float)
    for bad in ("abc", "0", "-3", "1.5", True):
        with pytest.raises(EvictionConfigError):
            parse_budget(bad)


def test_every_preset_loads_and_builds_its_policy():
    presets = sorted(PRESETS_DIR.glob("*.yaml"))
    assert len(presets) >= 6
    for path in presets:
        config = EvictionConfig.from_yaml(path)
        assert config.policy in path.name
        assert config.build_policy().name == config.policy


def test_merge_overrides_and_options():
    base = EvictionConfig.from_yaml(PRESETS_DIR / "madakv-20.yaml")
    smaller = base.merged(budget="0.1", theta=0.8)
    assert (smaller.budget, smaller.options["theta"], smaller.options["mpa"]) == (0.1, 0.8, True)
    policy = smaller.build_policy()
    assert isinstance(policy, MadaKV) and policy.theta == 0.8
    assert base.build_policy().window == 12 and MadaKV().window == 12  # MadaKV's default window
    switched = base.merged(policy="snapkv")  # MadaKV's options and default window do not leak into SnapKV
    assert switched.policy == "snapkv" and dict(switched.options) == {} and switched.budget == 0.2
    assert switched.build_policy().window == 32
    assert base.merged(policy="snapkv", window=16).build_policy().window == 16
    assert base.merged(window=16).merged(policy="snapkv").build_policy().window == 16  # a set window stays
    assert base.merged(policy="none").build_policy() is None


@pytest.mark.parametrize("data, message", [
    ({"policy": "fastkv"}, "unknown eviction policy"),
    ({"policy": "madakv", "budget": 2.5}, "ratio must be in"),
    ({"policy": "madakv", "budget": 16, "window": 32}, "smaller than the budget"),
    ({"policy": "madakv", "thetta": 0.9}, "unknown option"),
    ({"policy": "madakv", "theta": 0}, "theta must be in"),
    (["madakv"], "expected a mapping"),
])
def test_bad_configs_fail_with_one_clear_line(data, message):
    with pytest.raises(EvictionConfigError, match=message) as err:
        EvictionConfig.from_mapping(data)
    assert "\n" not in str(err.value)


def test_yaml_errors(tmp_path: Path):
    with pytest.raises(EvictionConfigError, match="neither a file nor a preset; presets: h2o-20"):
        EvictionConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: [unclosed\n")
    with pytest.raises(EvictionConfigError, match="not valid YAML"):
        EvictionConfig.from_yaml(bad)


def test_presets_load_by_name():
    assert EvictionConfig.from_yaml("madakv-20") == EvictionConfig.from_yaml(PRESETS_DIR / "madakv-20.yaml")
    assert EvictionConfig.from_yaml("snapkv-10").budget == 0.1
