#!/usr/bin/env bash
# The main job on the built-in default: on-policy vs the same training on stale data, uncorrected and
# with reweighting rules, side by side on the machine's cores (python -m workbench compare); writes one
# figure and one table under runs/mission/ and prints the table. Any compare flag passes through
# (e.g. --seeds 3, --staleness 8, --rules ppo_clip,topr). The single run: .venv/bin/python -m workbench run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source scripts/env.sh
exec .venv/bin/python -m workbench compare "$@"
