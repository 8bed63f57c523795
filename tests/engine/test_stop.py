"""StopChecker: matches across delta boundaries, earliest-ending match wins, hold-back and flush."""

from __future__ import annotations

import itertools

import pytest

from openr2.engine.stop import StopChecker


def all_splits(text: str):
    """Every way to cut text into non-empty consecutive deltas (2**(len-1) of them)."""
    for cuts in itertools.product([False, True], repeat=len(text) - 1):
        parts, start = [], 0
        for i, cut in enumerate(cuts, 1):
            if cut:
                parts.append(text[start:i])
                start = i
        parts.append(text[start:])
        yield parts


def run(stop, deltas, include=False):
    """Feed deltas until stopped; return (everything emitted, stopped, matched string)."""
    checker = StopChecker(stop, include_stop_str_in_output=include)
    emitted = []
    for d in deltas:
        text, stopped = checker.feed(d)
        emitted.append(text)
        if stopped:
            return "".join(emitted), True, checker.matched
    emitted.append(checker.flush())
    return "".join(emitted), False, None


@pytest.mark.parametrize("include", [False, True])
def test_every_split_gives_the_same_result(include):
    text = "hi wor: world. then more"
    for deltas in all_splits(text[:14]):  # 8192 splits of the part that holds the match
        deltas = deltas + [text[14:]]
        out, stopped, matched = run(["world", "wor!"], deltas, include)
        assert stopped and matched == "world"
        assert out == ("hi wor: world" if include else "hi wor: ")


def test_never_emits_a_possible_stop_prefix():
    checker = StopChecker(["</answer>"])
    assert checker.feed("the answer is 4</") == ("the answer is 4", False)
    assert checker.feed("ans") == ("", False)  # "</ans" could still become "</answer>"
    assert checker.feed("wer") == ("", False)
    assert checker.feed("!") == ("</answer!", False)  # now clearly not a stop string


def test_hold_back_is_at_most_longest_stop_minus_one():
    checker = StopChecker(["abcd", "zz"])
    assert checker.feed("abcabc") == ("abc", False)  # only the last "abc" might still become "abcd"
    assert checker.feed("x") == ("abcx", False)
    assert checker.feed("z") == ("", False)
    assert checker.feed("abcd") == ("z", True)


def test_earliest_match_wins():
    # two stop strings in one delta: the earlier one wins regardless of list order
    assert run(["END", "STOP"], ["a STOP b END"])[:3] == ("a ", True, "STOP")
    assert run(["STOP", "END"], ["a END b STOP"])[:3] == ("a ", True, "END")
    # nested: "b" ends before "abc", as a character-by-character stream would see it
    for deltas in all_splits("xabc"):
        assert run(["abc", "b"], deltas)[:3] == ("xa", True, "b")
    # same end: the longer string wins (it started earlier)
    assert run(["bc", "abc"], ["xabc"])[:3] == ("x", True, "abc")


def test_include_stop_str_in_output():
    assert run(["\n\n"], ["one\n", "\ntwo"], include=True)[:2] == ("one\n\n", True)
    assert run(["\n\n"], ["one\n", "\ntwo"], include=False)[:2] == ("one", True)


def test_flush_returns_held_tail_and_feed_after_stop_is_empty():
    checker = StopChecker(["<stop>"])
    assert checker.feed("hi <st") == ("hi ", False)
    assert checker.flush() == "<st"
    assert checker.flush() == ""
    checker = StopChecker(["x"])
    assert checker.feed("axb") == ("a", True)
    assert checker.feed("more") == ("", True)
    assert checker.flush() == ""


def test_no_stop_strings_passes_through():
    checker = StopChecker([])
    assert checker.feed("abc") == ("abc", False)
    assert checker.flush() == ""


def test_overlapping_prefixes_are_not_missed():
    # "aab" arrives after a partial "aa": a naive checker that discards the first "a" would miss it
    for deltas in all_splits("aaab!"):
        assert run(["aab"], deltas)[:3] == ("a", True, "aab")


def test_bad_stop_list():
    with pytest.raises(ValueError, match="stop"):
        StopChecker(["ok", ""])
    with pytest.raises(ValueError, match="stop"):
        StopChecker("abc")
