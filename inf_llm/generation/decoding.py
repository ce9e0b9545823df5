"""The text of a reply as it is generated: incremental decoding of its tokens (`IncrementalDecoder`) and the cut
before the first stop string (`StopStrings`), the one path every generated token's text takes (`Engine.generate`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)


class IncrementalDecoder:
    """The text of a growing reply, decoding a bounded tail of it per token (not the whole reply at every step).

    The text given out so far ends where `ids[prefix:read]` ends; a new token's text is
    `decode(ids[prefix:]) - decode(ids[prefix:read])`, so a token decodes with the few before it (a byte-level
    token that completes a multi-byte character, a SentencePiece word that loses its leading space only at the
    start of a text). While the tail decodes to an incomplete character (U+FFFD) or does not extend what was given
    out, it is held back and the next tokens are decoded with it. `finish()` gives what is still held back, checked
    against one decoding of the whole reply: the texts given out add up to `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self._prefix = self._read = 0
        self._given: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes ("" while it is held back)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        self._given.append(after[len(before) :])
        return self._given[-1]

    def finish(self) -> str:
        """The rest of the text (an incomplete character at the very end stays U+FFFD, as in tokenizer.decode)."""
        given = "".join(self._given)
        whole = self._decode(self.ids)
        if whole.startswith(given):
            rest = whole[len(given) :]
        else:  # a tokenizer whose decoding of a tail disagrees with the whole's: give what the tail adds
            logger.warning("incremental decoding diverged from the whole reply's decoding after %d characters",
                           len(given))
            before = self._decode(self.ids[self._prefix : self._read])
            after = self._decode(self.ids[self._prefix :])
            rest = after[len(before) :] if after.startswith(before) else ""
        self._prefix = self._read = len(self.ids)
        self._given = [given + rest]
        return rest


class StopStrings:
    """Cuts streamed text before the first stop string. Text that may be the start of a stop string is held back
    until the next piece shows whether it is one, so that no part of a stop string is ever given out."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stop for stop in stops if stop)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(the text that can be shown, whether a stop string was found). After a stop, nothing more is shown."""
        text = self._held + text
        hits = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:n]):
                    hold = n
                    break
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """What is held back, at the end of the reply (it was not a stop string)."""
        held, self._held = self._held, ""
        return held
