"""``python -m workbench``: the CLI. A Ctrl-C or SIGTERM while the libraries are still importing
(several seconds before the CLI installs its stop handlers) exits with one line and the signal's
exit code instead of a traceback or a silent 143."""

import signal
import sys


class _Starting(BaseException):
    """Raised by the start-up SIGTERM handler: unwinds the imports like a KeyboardInterrupt."""


def _term_while_starting(signum, frame):
    raise _Starting


_previous = signal.signal(signal.SIGTERM, _term_while_starting)
try:
    import workbench  # noqa: F401  (sets OMP_WAIT_POLICY / HF_HUB_OFFLINE before torch loads)
    from workbench.cli import main
except (KeyboardInterrupt, _Starting) as e:
    code = 130 if isinstance(e, KeyboardInterrupt) else 143
    print("interrupted while starting: nothing was run", file=sys.stderr)
    sys.exit(code)
finally:  # from here the CLI's own handlers (runs/stop.py) take over
    signal.signal(signal.SIGTERM, _previous)

sys.exit(main())
