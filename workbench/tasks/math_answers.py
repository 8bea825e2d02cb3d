"""Final answers of math problems and their equivalence (the ``math_equiv`` reward, data tasks).

Two backends, chosen by ``backend``: ``"math_verify"`` is Hugging Face's Math-Verify
(``pip install 'workbench[data]'``; ``parse`` + ``verify``: LaTeX and plain expressions through
SymPy, so ``2\\sqrt{2}`` equals ``\\sqrt{8}``, ``x+1`` equals ``1+x``, sets, intervals, matrices,
units); ``"builtin"`` is the exact-rational fallback below; ``"auto"`` (default) uses Math-Verify
when it is installed, else the fallback.

The fallback accepts exactly this, and nothing symbolic:

- **Final answer** of a completion (``final_answer``): the content of the last ``\\boxed{...}`` (or
  ``\\fbox{...}``, braces balanced), else the rest of the line after the last ``####`` (GSM8K),
  else the whole text.
- **A number** (``to_number``), after unwrapping any of ``$...$``, ``$$...$$``, ``\\(...\\)``,
  ``\\[...\\]``, a whole ``\\boxed{...}`` and one trailing period: an optional sign (``-``, ``+``,
  ``\u2212``) then an integer (``007`` is 7), a decimal (``3.50``, ``.5``, ``5.``), an integer or
  decimal with thousands separators in groups of three (``1,234``, ``1{,}234.5``), a fraction of
  two integers ``a/b``, or ``\\frac{a}{b}`` / ``\\dfrac`` / ``\\tfrac`` of two integers (b != 0);
  a trailing ``%`` or ``\\%`` is dropped and the number kept *as stated* (``50%`` equals ``50``, not
  ``0.5``). Numbers compare exactly as ``fractions.Fraction`` (``0.5`` == ``1/2`` ==
  ``\\frac{2}{4}``; ``0.333`` != ``1/3``). Not accepted: scientific notation, ``\\sqrt``, ``\\pi``,
  units and ``\\text{...}``, currency signs, mixed numbers, spaces as thousands separators.
- **Numeric reference, prose completion**: when the reference is a number and the completion's
  final answer is not, the last number written in the completion is compared ("so it is 42." is
  42; lm-eval-harness's flexible GSM8K extraction takes the last number too).
- **Non-numeric reference**: exact string comparison of the unwrapped final answers with every
  whitespace removed (``A`` equals `` A ``; ``x+1`` does not equal ``1+x``: that needs Math-Verify).

With Math-Verify, an answer counts as equivalent when the fallback or Math-Verify says so: the
fallback's verdicts are exact (equal rationals, equal strings), and it covers the answers that
Math-Verify does not parse (a letter choice, a word), so the union only adds. Math-Verify bounds
its SymPy work with ``signal.alarm`` timeouts, which work only in the main thread; from any other
thread (the notebook trainer) it runs without a timeout.

Math-Verify: Hynek Kydlicek, Hugging Face 2025, https://github.com/huggingface/Math-Verify. GSM8K:
Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems", arXiv:2110.14168. MATH:
Hendrycks et al. 2021, "Measuring Mathematical Problem Solving With the MATH Dataset",
arXiv:2103.03874.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import threading
from fractions import Fraction
from types import ModuleType

from workbench.errors import WorkbenchError, bad_value

BACKENDS = ("auto", "math_verify", "builtin")
INSTALL_HINT = "pip install 'workbench[data]'"
MATH_VERIFY_TIMEOUT_S = 5  # Math-Verify's own default for parse and verify

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_SIGN = r"[-+\u2212]"
_PLAIN = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+"  # 1,234.5 | 1234 | 5. | .5
_NUMBER = re.compile(rf"({_SIGN}?)\s*(?:\\[dt]?frac\{{(\d+)\}}\{{(\d+)\}}|(\d+)/(\d+)|({_PLAIN}))")
_NUMBER_IN_TEXT = re.compile(
    rf"(?<![\w.,/\\]){_SIGN}?(?:\\[dt]?frac\{{\d+\}}\{{\d+\}}|\d+/\d+|(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?|\.\d+)")


def _closing(text: str, start: int) -> int | None:
    """Index of the ``}`` closing the brace opened just before ``text[start]``, or None."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (braces balanced), or
    None when there is none (or the last one is never closed)."""
    opens = list(_BOX_OPEN.finditer(text))
    if not opens:
        return None
    end = _closing(text, opens[-1].end())
    return None if end is None else text[opens[-1].end():end]


def after_hashes(text: str) -> str | None:
    """GSM8K's final answer: the rest of the line after the last ``####``, or None without one."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].split("\n", 1)[0].strip()


def final_answer(text: str) -> str:
    """The final answer written in ``text``: last ``\\boxed{}``, else after ``####``, else all of it."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    hashed = after_hashes(text)
    return (hashed if hashed is not None else text).strip()


def _unwrap(text: str) -> str:
    """``text`` without enclosing math delimiters, a whole ``\\boxed{}`` and a trailing period."""
    s = text.strip()
    while True:
        before = s
        for left, right in _DELIMITERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left):len(s) - len(right)].strip()
                break
        box = _BOX_OPEN.match(s)
        if box and _closing(s, box.end()) == len(s) - 1:  # the whole text is one \\boxed{...}
            s = s[box.end():-1].strip()
        if s.endswith(".") and len(s) > 1 and not s[-2].isdigit():
            s = s[:-1].strip()  # "42 ." or "$42$." (a digit before the period: "5." is a decimal)
        if s == before:
            return s


def to_number(text: str) -> Fraction | None:
    """``text`` as an exact rational when it is one number in an accepted form (module docstring)."""
    s = _unwrap(text).replace("{,}", ",")
    if s.endswith("\\%"):
        s = s[:-2].rstrip()
    elif s.endswith("%"):
        s = s[:-1].rstrip()
    m = _NUMBER.fullmatch(s)
    if m is None:
        return None
    sign, fnum, fden, num, den, plain = m.groups()
    if fnum is not None or num is not None:
        top, bottom = (int(fnum), int(fden)) if fnum is not None else (int(num), int(den))
        if bottom == 0:
            return None
        value = Fraction(top, bottom)
    else:
        value = Fraction(plain.replace(",", ""))
    return -value if sign in ("-", "\u2212") else value


def _canon(text: str) -> str:
    return "".join(_unwrap(text).split())


def builtin_equivalent(completion: str, reference: str) -> bool:
    """The fallback's verdict (module docstring): exact rationals, else exact strings."""
    pred, ref = final_answer(completion), final_answer(reference)
    want = to_number(ref)
    if want is None:
        return _canon(ref) != "" and _canon(pred) == _canon(ref)
    got = to_number(pred)
    if got is None:
        numbers = _NUMBER_IN_TEXT.findall(pred)
        got = to_number(numbers[-1]) if numbers else None
    return got is not None and got == want


@functools.cache
def _math_verify() -> ModuleType | None:
    """The ``math_verify`` module, or None when it is not installed (imported once, on first use:
    SymPy takes a second to import, which the CLI should not pay when no math reward is used)."""
    if importlib.util.find_spec("math_verify") is None:
        return None
    return importlib.import_module("math_verify")


def math_verify_available() -> bool:
    return _math_verify() is not None


def check_backend(backend: object) -> str:
    """``backend`` if it is valid and usable here, else a one-line WorkbenchError."""
    if backend not in BACKENDS:
        raise bad_value("math_equiv backend", backend, " | ".join(BACKENDS))
    if backend == "math_verify" and not math_verify_available():
        raise WorkbenchError(f"math_equiv backend='math_verify' needs the math-verify package, which is "
                             f"not installed: {INSTALL_HINT} (or backend='auto' for the built-in fallback)")
    return str(backend)


def _math_verify_equivalent(mv: ModuleType, completion: str, reference: str) -> bool:
    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    delimited = any(mark in reference for mark in ("$", "\\boxed", "\\(", "\\["))
    gold = mv.parse(reference if delimited else f"${reference}$", parsing_timeout=timeout)
    hashed = after_hashes(completion)  # Math-Verify does not know GSM8K's "#### 42" marker
    pred = mv.parse(completion if hashed is None else hashed, parsing_timeout=timeout)
    return bool(gold and pred and mv.verify(gold, pred, timeout_seconds=timeout))


def equivalent(completion: str, reference: str, backend: str = "auto") -> bool:
    """Whether the final answer of ``completion`` is mathematically equal to ``reference``."""
    mv = _math_verify() if check_backend(backend) != "builtin" else None
    if builtin_equivalent(completion, reference):  # exact verdicts: no SymPy needed
        return True
    return mv is not None and _math_verify_equivalent(mv, completion, reference)


__all__ = ["BACKENDS", "INSTALL_HINT", "after_hashes", "builtin_equivalent", "check_backend", "equivalent",
           "final_answer", "last_boxed", "math_verify_available", "to_number"]
