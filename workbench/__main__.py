"""``python -m workbench``: the CLI. A Ctrl-C while the libraries are still importing (several
seconds before the CLI installs its stop handlers) exits with one line instead of a traceback."""

import sys

try:
    import workbench  # noqa: F401  (sets OMP_WAIT_POLICY / HF_HUB_OFFLINE before torch loads)
    from workbench.cli import main
except KeyboardInterrupt:
    print("interrupted while starting: nothing was run", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
