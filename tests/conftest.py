"""Shared fixtures: a char tokenizer, a tiny model (~35 k parameters), a small addition task and a
sampler over the tiny model. Everything is function-scoped and cheap to build (a few ms), so a test
that trains or mutates a fixture never leaks into another test. Thread count is left to the runner.
"""

from __future__ import annotations

import pytest

from contention import CURRENT, Contention

import workbench  # noqa: F401  (process defaults before torch loads)
from workbench.steps.generate import TransformersSampler
from workbench.policy.model import TINY_MODEL, ModelConfig, build_model
from workbench.tasks import make_task
from workbench.policy.tokenizer import build_char_tokenizer


@pytest.fixture
def tokenizer():
    """The default character-level tokenizer (digits, lowercase, ``+-*/=:<>()., ``)."""
    return build_char_tokenizer()


@pytest.fixture
def tiny_model_config():
    """A ~35 k-parameter Llama-style config: hidden 32, 2 layers, 4 heads."""
    return ModelConfig(**TINY_MODEL)


@pytest.fixture
def tiny_model(tiny_model_config, tokenizer):
    """Untrained model built from ``tiny_model_config`` with seed 0."""
    return build_model(tiny_model_config, tokenizer, seed=0)


@pytest.fixture
def addition_task():
    """Addition (1-3 digit operands) with a 32-example held-out set."""
    return make_task("addition", heldout_size=32)


@pytest.fixture
def sampler(tiny_model, tokenizer):
    """A TransformersSampler over ``tiny_model``."""
    return TransformersSampler(tiny_model, tokenizer)


@pytest.fixture
def contention():
    """A ``contention.Contention`` sampling the machine while the test runs (timed notebook tests:
    ``test_notebooks.load_factor`` reads it)."""
    meter = Contention().start()
    CURRENT.append(meter)
    yield meter
    meter.stop()
    CURRENT.remove(meter)
