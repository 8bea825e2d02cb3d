"""Rewards of the score step: reward functions (``REWARDS``) and their weighted combination.

Built in: ``exact_match``, ``final_answer`` (the text after the last marker, e.g. the ``scratchpad``
task's ``>``), ``math_equiv`` (final answers compared mathematically,
``workbench.tasks.math_answers``), ``format``, ``overlong`` (alias ``length_penalty``). A reward function
is a plain callable
``fn(prompts: list[str], completions: list[str], **kwargs) -> list[float]`` (one finite number per
completion). ``kwargs`` always hold ``answers`` (list[str]), ``response_lengths`` (list[int], real
response tokens from ``response_mask``, EOS included) and every key of the per-example ``extras``
dicts as a list (``extras=[{"difficulty": 2}, ...]`` -> ``difficulty=[2, ...]``; a key missing from
some rows is ``None`` there). Functions must accept ``**kwargs``. A spec is a list of terms
``name_or_callable`` | ``(name_or_callable, weight)`` | ``(name_or_callable, weight, params)``;
``params`` are extra keyword arguments for that one function (e.g. ``{"max_len": 64}``). Bad
output (exception, None, wrong length, non-number, bool, NaN/inf) is a one-line ``WorkbenchError``;
nothing is silently turned into 0. Lists, tuples, 1-D tensors and 1-D numpy arrays are accepted;
dicts, sets, strings and generators are refused (a dict's keys or a set's order would silently
become the rewards).

Left out: KL-in-reward shaping, model-based (LLM-judge) rewards.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import numbers
from typing import Any, Callable, Sequence, Union

import torch

from workbench.errors import WorkbenchError, bad_value
from workbench.tasks.math_answers import check_backend, equivalent
from workbench.registry import Registry
from workbench.rollouts import Rollouts

RewardFn = Callable[..., Sequence[float]]
RewardTerm = Union[str, RewardFn, tuple]
RewardSpec = Union[RewardTerm, Sequence[RewardTerm]]
"""``"exact_match"``, ``[("exact_match", 1.0), ("format", 1.0, {"value": 0.1})]``, ..."""

REWARDS: Registry[RewardFn] = Registry("reward")


@REWARDS.register("exact_match", summary="1.0 if completion.strip() == answer.strip() else 0.0")
def exact_match(
    prompts: list[str], completions: list[str], *, answers: list[str], **kwargs: Any
) -> list[float]:
    return [1.0 if c.strip() == a.strip() else 0.0 for c, a in zip(completions, answers)]


def _check_marker(params: dict[str, Any]) -> None:
    marker = params.get("marker", ">")
    if not isinstance(marker, str) or not marker:
        raise WorkbenchError(f"final_answer.marker={marker!r} is invalid: expected a non-empty string")


def _after(text: str, marker: str) -> str | None:
    return text.rsplit(marker, 1)[1].strip() if marker in text else None


@REWARDS.register("final_answer", summary="1.0 if the text after the last marker (default '>') equals the "
                  "answer's; the reasoning before it is not graded (the scratchpad task's verify)",
                  check=_check_marker)
def final_answer(
    prompts: list[str], completions: list[str], *, answers: list[str], marker: str = ">", **kwargs: Any
) -> list[float]:
    """Grades only the final answer, written after the last ``marker``, as verifiable-reward LLM RL
    grades only a chain of thought's final answer: ``"1+4+0=05,>5"`` and ``"1+4+0=07,>5"`` both match
    the answer ``"1+4+0=05,>5"``. A completion without the marker gets 0; an answer without it is
    compared whole."""
    out = []
    for c, a in zip(completions, answers):
        want = _after(a, marker)
        got = _after(c, marker)
        out.append(1.0 if got is not None and got == (a.strip() if want is None else want) else 0.0)
    return out


@REWARDS.register(
    "math_equiv",
    summary="1.0 if the completion's final answer (last \\boxed{}, after ####, else the text) is "
    "mathematically equal to the answer: Math-Verify when installed, else exact rationals "
    "(backend: auto | math_verify | builtin)",
    paper="Math-Verify (Hugging Face 2025); GSM8K arXiv:2110.14168; MATH arXiv:2103.03874",
    check=lambda params: check_backend(params.get("backend", "auto")),
)
def math_equiv(
    prompts: list[str], completions: list[str], *, answers: list[str], backend: str = "auto", **kwargs: Any
) -> list[float]:
    """Mathematical equivalence of each completion's final answer with the reference answer.

    ``backend="auto"`` uses Hugging Face's Math-Verify (``pip install 'workbench[data]'``) when it
    is installed, else the built-in fallback; ``"builtin"`` always the fallback (numbers compared
    exactly as rationals, other answers as strings); ``"math_verify"`` requires the package. What
    each accepts: ``workbench.tasks.math_answers``.
    """
    check_backend(backend)
    return [1.0 if equivalent(c, a, backend) else 0.0 for c, a in zip(completions, answers)]


def _char_classes(text: str) -> set[str]:
    """Classes a character can belong to: 'digit', 'alpha', 'space', else the literal character."""
    return {"digit" if ch.isdigit() else "alpha" if ch.isalpha() else "space" if ch.isspace() else ch
            for ch in text}


@REWARDS.register(
    "format",
    summary="`value` (default 0.1) if the stripped completion is non-empty and uses only the "
    "answer's character classes (digits / letters / whitespace; any other character literally)",
)
def format_reward(
    prompts: list[str], completions: list[str], *, answers: list[str], value: float = 0.1, **kwargs: Any
) -> list[float]:
    """Partial credit for a well-formed answer, generic over tasks.

    The allowed characters come from the reference answer: a digit in the answer allows every digit,
    a letter every letter, a space every whitespace; any other character (``-``, ``.``, ``,``) only
    itself. So for addition (answer ``"57"``) only digit strings score; for ``"-3.5"`` digits, ``-``
    and ``.``; for ``"cab"`` letters. Both sides are stripped first.
    """
    out = []
    for c, a in zip(completions, answers):
        c = c.strip()
        out.append(float(value) if c and _char_classes(c) <= _char_classes(a.strip()) else 0.0)
    return out


@REWARDS.register(
    "overlong",
    paper="DAPO arXiv:2503.14476",
    summary="DAPO soft overlong penalty: 0 up to max_len - cache_len, linear to -penalty_factor at "
    "max_len, -penalty_factor beyond; lengths in tokens (default) or characters",
)
def overlong(
    prompts: list[str],
    completions: list[str],
    *,
    max_len: int | None = None,
    cache_len: int | None = None,
    penalty_factor: float = 1.0,
    unit: str = "tokens",
    response_lengths: list[int] | None = None,
    **kwargs: Any,
) -> list[float]:
    """DAPO overlong reward shaping (DAPO, arXiv:2503.14476), L_max = ``max_len``, L_cache = ``cache_len``.

    ``unit="tokens"`` (default, as in DAPO) measures ``response_lengths`` (real response tokens,
    EOS included); ``unit="chars"`` measures ``len(completion)``. ``max_len`` is required (the
    generation cap); ``cache_len`` defaults to ``max_len // 5`` (DAPO's 4096 / 20480). Beyond
    ``max_len`` the paper's -1 is scaled by ``penalty_factor`` so the penalty is continuous.
    """
    if max_len is None or int(max_len) <= 0:
        raise bad_value("overlong max_len", max_len, "a positive int (the response length cap), "
                        "e.g. (\"overlong\", 1.0, {\"max_len\": 64})")
    cache = max(1, int(max_len) // 5) if cache_len is None else int(cache_len)
    if not 0 < cache <= int(max_len):
        raise bad_value("overlong cache_len", cache_len, f"an int in [1, max_len={max_len}]")
    if unit == "tokens":
        if response_lengths is None:
            raise bad_value("overlong response_lengths", None, "a list of token counts (or unit='chars')")
        lengths = [int(n) for n in response_lengths]
    elif unit == "chars":
        lengths = [len(c) for c in completions]
    else:
        raise bad_value("overlong unit", unit, "one of: tokens, chars")
    expected = int(max_len) - cache
    out = []
    for n in lengths:
        if n <= expected:
            out.append(0.0)
        elif n <= max_len:
            out.append((expected - n) / cache * float(penalty_factor))
        else:
            out.append(-float(penalty_factor))
    return out


REWARDS.add("length_penalty", overlong, **{**REWARDS.meta("overlong"), "alias_of": "overlong"})


def _fn_name(fn: Any) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    return getattr(inner, "__name__", None) or type(inner).__name__


def _parse_spec(spec: RewardSpec) -> list[tuple[str, RewardFn, float, dict[str, Any]]]:
    """Normalise a spec into (name, fn, weight, params) terms; every bad piece is a WorkbenchError."""
    single = isinstance(spec, str) or callable(spec) or (
        isinstance(spec, tuple) and bool(spec) and (isinstance(spec[0], str) or callable(spec[0])))
    terms = [spec] if single else list(spec)
    if not terms:
        raise bad_value("rewards_spec", spec, "at least one reward, e.g. [('exact_match', 1.0)]")
    out = []
    for term in terms:
        item, weight, params = term, 1.0, {}
        if isinstance(term, tuple):
            if not 1 <= len(term) <= 3:
                raise bad_value("rewards_spec term", term, "(name_or_callable, weight[, params])")
            item = term[0]
            weight = term[1] if len(term) > 1 else 1.0
            params = term[2] if len(term) > 2 else {}
        if isinstance(item, str):
            name, fn = item, REWARDS.get(item)
        elif callable(item):
            name, fn = _fn_name(item), item
        else:
            names = ", ".join(REWARDS.names())
            raise bad_value("rewards_spec term", term, f"a reward name ({names}) or a callable")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise bad_value(f"weight of reward {name!r}", weight, "a finite number")
        if not isinstance(params, dict):
            raise bad_value(f"params of reward {name!r}", params, "a dict of keyword arguments")
        if isinstance(item, str):
            _check_param_names(name, fn, params)
            check = REWARDS.meta(name).get("check")  # the values of a registered reward's params
            if check is not None:
                check(params)
        out.append((name, fn, float(weight), dict(params)))
    return out


PER_EXAMPLE = ("prompts", "completions", "answers", "response_lengths")


def _check_param_names(name: str, fn: RewardFn, params: dict[str, Any]) -> None:
    """A registered reward's params must be its own keyword parameters: every function takes
    ``**kwargs``, which would swallow a misspelt one (``max_lne``) without a word."""
    valid = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in PER_EXAMPLE]
    unknown = sorted(set(params) - set(valid), key=str)
    if unknown:
        raise WorkbenchError(f"reward {name!r} has no parameter {unknown[0]!r}: valid parameters are "
                             f"{', '.join(valid) or '(none)'}")


def validate_spec(spec: RewardSpec) -> None:
    """Check a spec without calling any function (names, weights, params): ``RunConfig`` does at
    construction, so a bad reward term fails before a model is built."""
    _parse_spec(spec)


def _check_output(name: str, out: Any, n: int) -> torch.Tensor:
    """Validate a reward function's output into a float64 tensor [n], or raise a one-line error."""
    want = f"a list of {n} finite floats (one per completion)"
    array = isinstance(out, torch.Tensor) or (hasattr(out, "ndim") and hasattr(out, "tolist"))  # numpy too
    sequence = isinstance(out, collections.abc.Sequence) and not isinstance(out, (str, bytes, bytearray))
    if not (array or sequence):
        raise WorkbenchError(f"reward function {name!r} returned {_short(out)}: expected {want}")
    if array and out.ndim != 1:
        shape = tuple(getattr(out, "shape", ()))
        raise WorkbenchError(f"reward function {name!r} returned an array of shape {shape}: expected {want}")
    values = out.tolist() if array else list(out)
    if len(values) != n:
        raise WorkbenchError(f"reward function {name!r} returned {len(values)} values: expected {want}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise WorkbenchError(
                f"reward function {name!r} returned {_short(v)} at index {i}: expected a finite float"
            )
    return torch.tensor(values, dtype=torch.float64, device="cpu")  # [n], from Python numbers


def _short(v: Any) -> str:
    text = repr(v).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def combine(spec: RewardSpec, prompts: list[str], completions: list[str], **kwargs: Any) -> torch.Tensor:
    """Weighted sum of the spec's reward functions on raw lists -> float32 tensor [B].

    ``kwargs`` (``answers`` plus any per-example lists) are passed to every function, merged with
    that term's ``params``; a params key that shadows a per-example key is an error.
    """
    n = len(completions)
    total = torch.zeros(n, dtype=torch.float64, device="cpu")  # [B], reward functions return lists
    for name, fn, weight, params in _parse_spec(spec):
        clash = sorted(set(params) & set(kwargs))
        if clash:
            raise bad_value(f"params of reward {name!r}", params,
                            f"no keys shared with per-example fields {clash}")
        try:
            out = fn(list(prompts), list(completions), **kwargs, **params)
        except Exception as e:  # the function failed: one line naming it, chained for the traceback
            msg = str(e).replace("\n", " ")
            raise WorkbenchError(f"reward function {name!r} raised {type(e).__name__}: {msg}") from e
        total += weight * _check_output(name, out, n)  # [B]
    return total.float()  # [B]


def reward_kwargs(rollouts: Rollouts) -> dict[str, Any]:
    """The keyword arguments reward functions receive for ``rollouts`` (see module docstring)."""
    n = len(rollouts)
    for f in ("prompts", "completions", "answers"):
        if len(getattr(rollouts, f)) != n:
            got = f"<{len(getattr(rollouts, f))} items>"
            raise bad_value(f"rollouts.{f}", got, f"{n} items (one per sequence)")
    if rollouts.extras and len(rollouts.extras) != n:
        raise bad_value("rollouts.extras", f"<{len(rollouts.extras)} items>", f"0 or {n} dicts")
    kw: dict[str, Any] = {
        "answers": list(rollouts.answers),
        "response_lengths": [int(x) for x in rollouts.response_lengths.round().long().tolist()],
    }
    keys: list[str] = []
    for ex in rollouts.extras:
        keys.extend(k for k in ex if k not in keys)
    for k in keys:
        if k in kw or k in ("prompts", "completions"):
            reserved = "prompts, completions, answers, response_lengths"
            raise bad_value("extras key", k, f"a name other than {reserved}")
        kw[k] = [ex.get(k) for ex in rollouts.extras]
    return kw


def compute_rewards(spec: RewardSpec, rollouts: Rollouts) -> torch.Tensor:
    """Weighted sum of the spec's reward functions on ``rollouts`` -> float32 tensor [B], on the
    device of ``rollouts``' tensors."""
    total = combine(spec, rollouts.prompts, rollouts.completions, **reward_kwargs(rollouts))  # [B] CPU
    return total.to(rollouts.response_mask.device)


__all__ = [
    "REWARDS", "RewardFn", "RewardSpec", "RewardTerm", "combine", "compute_rewards", "exact_match", "format_reward",
    "math_equiv", "overlong", "reward_kwargs", "validate_spec",
]
