"""The real fast path: one round with the client model compiled by inductor gives the plain
round's weights (about a minute of C++ compiling on a 2-core CPU, so in the slow tier)."""

from __future__ import annotations

import shutil

import pytest

from tests.integration.test_fast_path import _assert_close, _final_weights


@pytest.mark.skipif(shutil.which("cc") is None, reason="inductor needs a C compiler")
def test_inductor_round_gives_the_plain_weights(tmp_path):
    """The real fast path (inductor); about a minute of compiling on a 2-core CPU."""
    plain = _final_weights(tmp_path, "plain")
    fast = _final_weights(tmp_path, "fast", compile=True)
    _assert_close(fast, plain)
