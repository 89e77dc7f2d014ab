"""Sampling memory is bounded: a longer completion costs its activations, not positions x vocabulary.

Runs bench/memory.py's measurement (a fresh process per point, peak RSS reset after the
models are built) with random models at the real 151,936-token vocabulary and tiny
bodies, so what grows with the completion is the logits, not the decoder's activations.
"""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO_ROOT

BATCH = 2
VOCAB = 151_936


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", REPO_ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_peak_does_not_grow_with_completion_length_beyond_activations():
    bench = _bench()
    short = bench.run_isolated("after", 128, BATCH, "tiny")
    long = bench.run_isolated("after", 1024, BATCH, "tiny")
    # What must grow: token ids, hidden states and attention over 8x the positions: a few
    # MB at these widths (measured: 223 -> 229 MB). The chunk buffers are fixed:
    # 64 positions x 151,936 x 4 B x a few buffers per model.
    assert long["contrast_mb"] - short["contrast_mb"] < 64, (short, long)
    assert long["contrast_mb"] < 400, long
    # The previous algorithm on the same input holds both models' logits of every
    # position: 2 x 2,048 x 151,936 x 4 B = 2.5 GB. The measurement must see that.
    old = bench.run_isolated("before", 1024, BATCH, "tiny")
    expected_growth_mb = 2 * BATCH * 1024 * VOCAB * 4 / 2**20
    assert old["contrast_mb"] > long["contrast_mb"] + 0.8 * expected_growth_mb, (old, long)
