#!/usr/bin/env bash
# The environment of the TRL comparison (bench/vs_trl.py): .venv-trl with TRL's GRPOTrainer and
# workbench side by side, so the bench runs both libraries in one process on one machine. Kept apart
# from .venv because trl pulls datasets, pandas and accelerate versions workbench does not need.
# Install order matters:
#   1. torch==2.13.0 first: the CPU build (the local wheel in pip's find-links; its local label
#      "+cpu" sorts above the CUDA build of the same version), so nothing later pulls a CUDA torch;
#   2. trl==1.16.0 and workbench (editable) in one resolve, so transformers satisfies both
#      (trl: >=4.56.2, workbench: >=5.0,<6);
#   3. last, remove torchvision, torchaudio and torchcodec if a resolve brought them: CUDA builds of
#      them fail to load beside CPU torch and break transformers' imports (as in scripts/test_engine.sh).
# pip's output goes to .venv-trl/install.log. Re-running is a no-op until pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/side_venv.sh
side_venv .venv-trl "trl setup"   # sets VENV, pip_, stamp
if side_venv_stale; then
  echo "trl setup: installing torch==2.13.0 (CPU), trl==1.16.0 and workbench into $VENV (log: $VENV/install.log)"
  {
    "${pip_[@]}" install --upgrade pip
    "${pip_[@]}" install "torch==2.13.0"
    "${pip_[@]}" install "trl==1.16.0" -e .
    "${pip_[@]}" uninstall -y torchvision torchaudio torchcodec
    # a CUDA torch here would silently make the comparison a different one: refuse it
    "$VENV/bin/python" - <<'PYEOF'
import torch, transformers, trl, workbench
assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None, f"torch {torch.__version__} (cuda {torch.version.cuda}) is not the 2.13.0 CPU build"
assert trl.__version__ == "1.16.0", f"trl {trl.__version__}, expected 1.16.0"
from trl import GRPOConfig, GRPOTrainer
print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PYEOF
  } > "$VENV/install.log" 2>&1 || { tail -n 30 "$VENV/install.log"; echo "trl setup: failed (see $VENV/install.log)"; exit 1; }
  tail -n 1 "$VENV/install.log"
  touch "$stamp"
fi
