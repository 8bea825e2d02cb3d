"""``python -m workbench entropy --task NAME``: per-token entropy of a policy's samples, beside LLM reasoning.

Design: the policy (``--model``) samples ``--group-size`` responses at temperature 1 to each of the
first ``--prompts`` held-out prompts of each ``--task``; every response token's full-softmax entropy
is summarised (shares below 0.01 / 0.1 / 0.5 nats, quantiles 50/80/95/99%) beside the published
shape of LLM chain-of-thought tokens (Wang et al. 2025, arXiv:2506.01939; the library is
``workbench.studies.token_entropy``). ``--model warm`` (the default) is the built-in model
warm-started on the task (``workbench.policy.warm_start``: cached, trained on a miss), ``tiny`` an
untrained ``TINY_MODEL`` (seconds; for trying the command), any other value a saved policy folder
(``load_policy``). Several tasks: ``--task scratchpad --task addition`` (``--task-params`` apply to
the first). ``--out DIR`` writes ``token_entropy.parquet`` (the table) and ``token_entropy.png``
(log-binned histograms with the published reference marked) after everything has been computed;
bad input is a one-line error and writes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from workbench.charts import png_bytes
from workbench.cli.config_flags import check_out_dir, parse_pairs
from workbench.errors import WorkbenchError
from workbench.policy.model import TINY_MODEL, ModelConfig, build_model, load_policy
from workbench.policy.tokenizer import build_char_tokenizer, tokenizer_alphabet
from workbench.policy.warm_start import warm_start
from workbench.runs.files import atomic_write_bytes
from workbench.runs.rundir import atomic_write_parquet
from workbench.studies.token_entropy import entropy_table, format_table, histogram_spec, sample_entropies
from workbench.tasks import TASKS, make_task

TABLE_FILE, FIGURE_FILE = "token_entropy.parquet", "token_entropy.png"
USAGE = ("python -m workbench entropy --task NAME [--task NAME ...] [--task-params k=v ...] "
         "[--model warm|tiny|PATH] [--prompts N] [--group-size G] [--seed S] [--threads T] [--out DIR]")


def add_parser(sub) -> None:
    """The ``entropy`` subcommand."""
    parser = sub.add_parser("entropy", help="per-token entropy of a policy's temperature-1 samples on a task, "
                            "beside the published shape of LLM reasoning tokens", description=__doc__,
                            usage=USAGE, epilog=f"tasks: {', '.join(TASKS.names())}",
                            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--task", action="append", required=True, help="a registered task (repeatable)")
    parser.add_argument("--task-params", nargs="*", default=[], metavar="KEY=VALUE",
                        help="params of the first --task, e.g. max_digits=3")
    parser.add_argument("--model", default="warm", help="warm (default: the warm-started built-in model), tiny "
                        "(untrained TINY_MODEL), or a saved policy folder")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts sampled (default 64)")
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--out", default=None, metavar="DIR", help=f"write {TABLE_FILE} and {FIGURE_FILE} here")


def _policy(model: str, task, log):
    if model == "warm":
        return load_policy(warm_start(task, log=log))
    if model == "tiny":
        tokenizer = build_char_tokenizer(tokenizer_alphabet(task.alphabet))
        return build_model(ModelConfig(**TINY_MODEL), tokenizer, seed=0), tokenizer
    if not Path(model).is_dir():
        raise WorkbenchError(f"--model {model!r} is invalid: expected warm, tiny or a saved policy folder")
    return load_policy(model)


def cli_main(args) -> int:
    """``python -m workbench entropy``: returns the exit code."""
    for flag in ("prompts", "group_size"):
        v = getattr(args, flag)
        if v < 1:
            raise WorkbenchError(f"--{flag.replace('_', '-')}={v} is invalid: expected an int >= 1")
    if args.threads < 0:
        raise WorkbenchError(f"--threads={args.threads} is invalid: expected an int >= 0 (0 = torch's default)")
    if args.out is not None:
        check_out_dir(args.out)
    params = parse_pairs("task-params", args.task_params)
    tasks = [make_task(name, **(params if i == 0 else {})) for i, name in enumerate(args.task)]  # all checked first
    if args.model not in ("warm", "tiny") and not Path(args.model).is_dir():
        raise WorkbenchError(f"--model {args.model!r} is invalid: expected warm, tiny or a saved policy folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = {}
    for task in tasks:
        model, tokenizer = _policy(args.model, task, log=print)
        name = task.name if task.name not in samples else f"{task.name} {task.params}"
        samples[name] = sample_entropies(model, tokenizer, task, prompts=args.prompts, group_size=args.group_size,
                                         seed=args.seed)
    table = entropy_table(samples)
    png = png_bytes(histogram_spec(samples)) if args.out is not None else b""  # rendered before anything is written
    print(format_table(table))
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_parquet(table, out / TABLE_FILE)
        atomic_write_bytes(out / FIGURE_FILE, png)
        print(f"table: {out / TABLE_FILE}\nfigure: {out / FIGURE_FILE}")
    return 0


__all__ = ["FIGURE_FILE", "TABLE_FILE", "USAGE", "add_parser", "cli_main"]
