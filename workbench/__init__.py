"""workbench: an interactive, notebook-first workbench for off-policy RL on language models.

The loop is five composable steps, generate -> score -> buffer -> reweight -> update
(``workbench.loop``). Importing the package sets safe process defaults *before* torch is imported:
``OMP_WAIT_POLICY=PASSIVE`` (OpenMP's spinning threads made 2-thread torch ~5x slower whenever
anything else held a core) and ``HF_HUB_OFFLINE=1`` (nothing is downloaded at run time). Both are
``setdefault``: a user's explicit environment wins.
"""

from __future__ import annotations

import os

PROCESS_DEFAULTS: dict[str, str] = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
"""Environment every workbench process (CLI, notebook kernel, sweep worker) starts with."""
for _key, _value in PROCESS_DEFAULTS.items():
    os.environ.setdefault(_key, _value)

from workbench.deferred_imports import defer_rfc3987_syntax  # after the environment defaults

defer_rfc3987_syntax()  # jsonschema (under altair) would build a grammar parser it never uses here

__version__ = "0.1.0"
