"""The suite's start order: the files named longest-first exist, so a rename cannot leave one
silently at its alphabetical place (where it would end the run on one worker alone)."""

from __future__ import annotations

from tests.conftest import LONGEST_FIRST, ROOT


def test_every_file_named_longest_first_exists_once():
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    missing = [name for name in LONGEST_FIRST if not (ROOT / "tests" / name).is_file()]
    assert missing == []
