#!/usr/bin/env bash
# "Prosperity before collapse" at CPU scale: runs (or resumes) the sweeps of the scratchpad regime and
# writes reports/prosperity.md with its figures (77 minutes measured on 2 cores; --size workshop: about 7).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source scripts/env.sh
exec .venv/bin/python -m workbench report "$@"
