"""``python -m workbench null-test [run flags]``: the lr = 0 numerics check of a config.

Runs ``--updates`` generate -> score -> update steps of the config given by the run flags (the same
flags as ``run``; ``--config`` too) with the learning rate at 0, under each numerics setting of
``--settings`` (default: exact, bf16 sampler logits, bf16 trainer logits, a bf16 autocast trainer,
trainer logit noise of std ``--noise``, and the replay pair when the config samples with top-k / top-p; ``workbench.studies.
null_test.SETTINGS``), and prints two tables: per setting, the tokens outside the objective's clip band
and the objective's own clip / mask / truncation metrics with the |log ratio| quantiles; then, for one
setting (``--weights-setting``, default the noisiest), the sequence-weight distribution exp(sum log r)
(sequence-level IS) vs exp(mean log r) (GSPO) per response length ``--lengths``, measured by resampling
that setting's token log-ratios and from the i.i.d. normal curve (``workbench.studies.sequence_weights``).
Nothing is written; bad input is a one-line error before any model is built.
"""

from __future__ import annotations

import argparse

from workbench.cli.config_flags import add_config_flags, config_from_args
from workbench.errors import WorkbenchError
from workbench.studies.null_test import (NOISE, SETTINGS, check_settings, default_settings, format_null_table,
                                         noisiest_setting, run_null_test)
from workbench.studies.sequence_weights import LENGTHS, format_weight_table, weight_table
from workbench.sweeps import split_values


def add_parser(sub) -> None:
    """The ``null-test`` subcommand."""
    parser = sub.add_parser("null-test", help="lr = 0 updates under injected numerics: the tokens clipped by "
                            "numerics alone, and the sequence weights they imply per length",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)
    parser.add_argument("--config", help="a config.json to start from (flags override it)")
    parser.add_argument("--updates", type=int, default=5, help="lr = 0 updates per setting (default 5)")
    parser.add_argument("--settings", default=None, metavar="S1,S2,...",
                        help=f"numerics settings, of: {', '.join(SETTINGS)} (default: config if it sets a numerics "
                             f"knob, exact, sampler_bf16, trainer_bf16, autocast_bf16, trainer_noise, and no_replay, "
                             f"replay with top-k/top-p)")
    parser.add_argument("--noise", type=float, default=NOISE,
                        help=f"std of the logit noise of the *_noise settings (default {NOISE})")
    parser.add_argument("--weights-setting", default=None, metavar="S",
                        help="the setting whose token log-ratios feed the sequence-weight table (default: the noisiest)")
    parser.add_argument("--lengths", default=None, metavar="L1,L2,...",
                        help=f"response lengths of the sequence-weight table (default {','.join(map(str, LENGTHS))})")
    add_config_flags(parser)


def _lengths(text: str | None) -> list[int]:
    if text is None:
        return list(LENGTHS)
    try:
        out = [int(v) for v in split_values(text)]
    except (TypeError, ValueError):
        out = []
    if not out or any(v < 1 for v in out):
        raise WorkbenchError(f"--lengths={text!r} is invalid: expected comma-separated ints >= 1, e.g. 4,16,64")
    return out


def cli_main(args) -> int:
    """``python -m workbench null-test``: returns the exit code."""
    config = config_from_args(args)
    if args.updates < 1:
        raise WorkbenchError(f"--updates={args.updates} is invalid: expected an int >= 1")
    if not 0 <= args.noise < float("inf"):
        raise WorkbenchError(f"--noise={args.noise} is invalid: expected a finite number >= 0")
    names = check_settings(default_settings(config) if args.settings is None else list(split_values(args.settings)))
    if args.weights_setting is not None and args.weights_setting not in names:
        raise WorkbenchError(f"--weights-setting={args.weights_setting!r} is invalid: expected one of the settings "
                             f"run: {', '.join(names)}")
    lengths = _lengths(args.lengths)
    result = run_null_test(config, names, updates=args.updates, noise=args.noise, log=print)
    print(format_null_table(result.table))
    print(f"weights bit-identical after {args.updates} lr = 0 updates per setting: {result.weights_unchanged}")
    chosen = args.weights_setting or noisiest_setting(result)
    pool = result.log_ratios[chosen]
    if pool.numel() == 0:
        raise WorkbenchError(f"setting {chosen!r} has no valid token: nothing to build sequence weights from")
    sigma, mean = float(pool.std(unbiased=False)), float(pool.mean())
    print()
    print(f"setting: {chosen}")
    print(format_weight_table(weight_table(pool, lengths, sigma=sigma, mean=mean, seed=config.seed), sigma, mean))
    return 0


__all__ = ["add_parser", "cli_main"]
