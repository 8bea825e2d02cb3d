# Sourced by the scripts that keep a second environment beside .venv (scripts/test_engine.sh:
# .venv-engine, scripts/setup_trl.sh: .venv-trl). `side_venv DIR LABEL` creates DIR with python3.11
# (else python3; $PYTHON overrides) if missing and sets VENV, pip_ (that venv's pip) and stamp (the
# file an install touches when it succeeded); `side_venv_stale` is true until an install succeeded
# after the last change of pyproject.toml, so re-running a script is a no-op until then.
side_venv() {
  VENV=$1
  local label=$2 py=${PYTHON:-python3.11}
  command -v "$py" >/dev/null 2>&1 || py=python3
  if [ ! -x "$VENV/bin/python" ]; then
    echo "$label: creating $VENV with $("$py" --version)"
    "$py" -m venv "$VENV"
  fi
  pip_=("$VENV/bin/python" -m pip)
  stamp=$VENV/.workbench-${VENV#.venv-}-installed
}

side_venv_stale() { [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; }
