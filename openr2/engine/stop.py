"""Stop strings for one request's text stream: what may be emitted now, and whether generation is over.

Owns: matching stop strings across delta boundaries, holding back text that could still turn into a
stop string, and truncating at the match. It does not own stop token ids, EOS or max_tokens (the engine
checks those on ids) nor UTF-8 safety (deltas arrive as whole characters from the detokeniser).

Which match wins: the one that *ends* first (then the longer one). That is what a character-by-character
stream would see, so the result is the same however the text is split into deltas. With stops "abc" and
"b", text "abc" stops at "b" and emits "a".
"""

from __future__ import annotations

from collections.abc import Sequence


class StopChecker:
    """Feed text deltas in order; each call returns (text to emit now, stopped)."""

    def __init__(self, stop: Sequence[str] = (), include_stop_str_in_output: bool = False):
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text (engine's stop_reason)
        self._held = ""  # unemitted tail: the longest suffix that is a proper prefix of some stop string

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stop:
            return delta, False
        # The held tail holds no whole stop string (we would have stopped), so any match in `text`
        # is new; it can start inside the held tail but never in text emitted earlier.
        text = self._held + delta
        best = None  # (end, -length, start, stop string)
        for s in self.stop:
            start = text.find(s)
            if start >= 0:
                cand = (start + len(s), -len(s), start, s)
                best = cand if best is None or cand < best else best
        if best is not None:
            end, _, start, s = best
            self.stopped, self.matched, self._held = True, s, ""
            return text[: end if self.include_stop_str_in_output else start], True
        hold = self._partial_suffix_len(text)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """The held-back tail, when the request ends for another reason (EOS, stop id, length, abort)."""
        tail, self._held = self._held, ""
        return tail

    def _partial_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        longest = max(len(s) for s in self.stop) - 1
        for k in range(min(longest, len(text)), 0, -1):
            tail = text[-k:]
            if any(len(s) > k and s.startswith(tail) for s in self.stop):
                return k
        return 0
