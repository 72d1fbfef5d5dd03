"""What a user's `pip install .` (not editable) gets: the presets travel inside the wheel."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # builds a wheel (about 10 s)


def test_wheel_carries_the_presets_and_loads_them_by_name(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("madakv_vllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    presets = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert sorted(Path(n).name for n in names if n.startswith("madakv_vllm/presets/")) == presets
    assert any(n.startswith("madakv_kernels/") for n in names) and not any(n.startswith("tests/") for n in names)
    # installed outside the source tree (and ahead of this checkout's editable install)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = ("import madakv_vllm, madakv_vllm.config as c; "
             "from madakv_vllm.vllm.plugin import add_cli_flags, config_from_args; import argparse; "
             "p = argparse.ArgumentParser(); add_cli_flags(p); "
             "cfg = config_from_args(p.parse_args(['--kv-eviction-config', 'madakv-20'])); "
             "print(madakv_vllm.__file__, c.PRESETS_DIR, cfg.policy, cfg.budget)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    module, presets_dir, policy, budget = out.stdout.split()
    assert module.startswith(str(target)) and presets_dir == str(target / "madakv_vllm" / "presets")
    assert (policy, budget) == ("madakv", "0.2")
