"""bench/bench_lookup.py: the teacher-forced lookup count, on a context where a 3-gram occurs
twice with different continuations and only the longer match finds the passage being copied."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_lookup  # noqa: E402


def test_accepted_len_is_the_common_prefix():
    assert bench_lookup.accepted_len([4, 5, 6], [4, 5, 7, 8]) == 2
    assert bench_lookup.accepted_len([4, 5, 6], [9]) == 0
    assert bench_lookup.accepted_len([4, 5, 6], [4, 5]) == 2  # the output ended


def test_a_longer_match_finds_the_copied_passage():
    # "7 1 2 3" is followed by "10 11 12", a later "8 1 2 3" by "20 21 22"; the output copies
    # the first passage
    prompt = [7, 1, 2, 3, 10, 11, 12, 8, 1, 2, 3, 20, 21, 22]
    out = [7, 1, 2, 3, 10, 11, 12]
    three = bench_lookup.teacher_forced(prompt, out, max_ngram=3, max_lookup=4)
    four = bench_lookup.teacher_forced(prompt, out, max_ngram=4, max_lookup=4)
    # [positions, first token right, tokens accepted] per match length. The context's suffix
    # after each output token: "7" (1-gram), "7 1" (2), "7 1 2" (3: all 4 right), then "7 1 2 3",
    # where the 3-gram "1 2 3" proposes the later passage (wrong at once) and the 4-gram the
    # copied one (all 3 right), then "... 10" and "... 11" (2 and 1 right)
    assert three[3] == [4, 3, 4 + 0 + 2 + 1]
    assert four[3] == [1, 1, 4] and four[4] == [3, 3, 3 + 2 + 1]
    assert three[1] == four[1] and three[2] == four[2]  # shorter matches alike


def test_rounds_count_only_the_positions_a_round_starts_at():
    # the prompt ends in "7 1 2" and the prefill's token is "3": the first round starts after
    # "7 1 2 3", where the 3-gram proposes "20 ..." (one token emitted, then "11 12" copied) and
    # the 4-gram "10 11 12" (all in one round)
    prompt = [7, 1, 2, 3, 10, 11, 12, 8, 1, 2, 3, 20, 21, 22, 7, 1, 2]
    out = [3, 10, 11, 12]
    assert bench_lookup.lookup_rounds(prompt, out, max_ngram=3, max_lookup=16) == 2
    assert bench_lookup.lookup_rounds(prompt, out, max_ngram=4, max_lookup=16) == 1
    # in the first test's text every round starts elsewhere: the same rounds either way, although
    # the longer match is right at more positions
    prompt, out = [7, 1, 2, 3, 10, 11, 12, 8, 1, 2, 3, 20, 21, 22], [7, 1, 2, 3, 10, 11, 12]
    assert [bench_lookup.lookup_rounds(prompt, out, n, 16) for n in (3, 4)] == [2, 2]
    assert bench_lookup.lookup_rounds(prompt, [7], 3, 16) == 0  # the prefill's token only
