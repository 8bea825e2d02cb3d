#!/usr/bin/env bash
# "Prosperity before collapse" at CPU scale: runs (or resumes) the sweeps on the built-in default and
# writes reports/prosperity.md with its figures (about 90 minutes on 2 cores; --size workshop: about 10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source scripts/env.sh
exec .venv/bin/python -m workbench report "$@"
