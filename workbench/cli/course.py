"""``python -m workbench course prepare|check|export-cache DIR|import-cache DIR``: a room ready for the course.

    python -m workbench course prepare              # build the warm starts, then run the self-check
    python -m workbench course check                # "ready", or one line per missing / failed thing
    python -m workbench course export-cache /media/usb/wb   # copy the warm starts for machines offline
    python -m workbench course import-cache /media/usb/wb   # checksums verified before anything is written

``--size tiny`` uses the tiny model's seconds-long warm start instead of the course's own (a dry run);
``--no-steps`` skips executing the course notebooks in ``check``. The logic is ``workbench.course.setup``.
``prepare`` and ``check`` exit 0 when ready and 1 otherwise; bad input is one line (exit 2).
"""

from __future__ import annotations

import argparse
import sys

from workbench.errors import WorkbenchError, one_line

SIZES = ("full", "tiny")  # as workbench.course.setup.SIZES, which loads torch: --help must not


def add_parser(sub) -> None:
    """The ``course`` subcommand and its four actions."""
    parser = sub.add_parser("course", help="set up a machine for the workshop course: prepare, check, copy the "
                            "warm-start cache offline", description=__doc__.split("\n\n", 2)[2],
                            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    actions = parser.add_subparsers(dest="course_command", required=True)
    for name, help_ in (("prepare", "build the warm starts the course needs, then run the self-check"),
                        ("check", "check this machine: python, torch, offline mode, warm starts, each course step")):
        p = actions.add_parser(name, help=help_, allow_abbrev=False)
        p.add_argument("--size", choices=SIZES, default="full",
                       help="full (the course's warm starts, default) or tiny (seconds to build: a dry run)")
        p.add_argument("--no-steps", action="store_true", help="do not execute the course notebooks")
    exp = actions.add_parser("export-cache", help="copy the course's warm starts and a checksum manifest into DIR",
                             allow_abbrev=False)
    exp.add_argument("dir", help="a new or empty folder (a USB stick, a share)")
    exp.add_argument("--size", choices=SIZES, default="full", help="which warm starts (default full)")
    imp = actions.add_parser("import-cache", help="verify DIR (written by export-cache) and add its warm starts "
                             "to this machine's cache", allow_abbrev=False)
    imp.add_argument("dir", help="a folder written by export-cache")


def cli_main(args) -> int:
    """``python -m workbench course ...``: returns the exit code (a ``WorkbenchError`` is the caller's: exit 2)."""
    try:
        from workbench.course import setup  # torch loads here; a broken install is one line, not a traceback
    except ImportError as e:
        print(f"cannot import workbench's dependencies ({one_line(e)}): install them with python -m pip install "
              "-e \".[notebooks]\" (README.md, \"Workshop\")", file=sys.stderr)
        return 1
    if args.course_command == "export-cache":
        print(f"wrote {setup.export_cache(args.dir, args.size)}")
        return 0
    if args.course_command == "import-cache":
        imported, kept = setup.import_cache(args.dir)
        for key in imported:
            print(f"imported warm start {key}")
        for key in kept:
            print(f"kept warm start {key} (already in the cache)")
        return 0
    if args.course_command in ("prepare", "check"):
        run = setup.prepare if args.course_command == "prepare" else setup.check
        problems = run(args.size, run_steps=not args.no_steps, log=lambda line: print(line, flush=True))
        for line in problems:
            print(line)
        if not problems:
            print("ready")
        return 1 if problems else 0
    raise WorkbenchError(f"course {args.course_command!r} is invalid: expected prepare, check, export-cache or "
                         "import-cache")
