"""Runs on disk: the run directory (``rundir``), its metrics log (``metrics``) and checkpoints
(``checkpoint``). Everything is safetensors, JSON or parquet; nothing is ever unpickled."""
