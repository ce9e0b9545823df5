"""One conversation: the transcript, the engine whose memory mirrors it, and rollback points at turn boundaries.

The invariant every method keeps: between turns, `engine.tokens == format.render(messages)`, i.e. the memory
holds exactly what a fresh prefill of the transcript would hold, turn-end tokens included. Each turn
therefore feeds only its new tokens: `_sync(target)` keeps the longest common prefix of the memory and the
target and feeds the rest.

A generated reply is not always re-tokenised into the tokens the model sampled (a BPE merge the model did not
take, a template that trims), so after each reply the memory is brought to the rendering of the transcript:
when the sampled tokens are not a prefix of it, the memory rolls back to the snapshot taken just before the
reply and re-reads the reply (cost: the reply's length, never the conversation's).

Rollback uses `Engine.snapshot()` / `restore()`, taken after each prompt and after each turn. A snapshot is
valid only along the history it was taken on: restoring one drops every later one. Only the last
`max_snapshots` are kept (each holds a copy of the local window); a rollback further back re-reads from the
oldest kept one, or from the start.

A turn is all or nothing (`_all_or_nothing`): when the reading of a message is interrupted (TurnCancelled) or
any error stops a turn (TurnFailed: a model call, a disk tier's read or write, a damaged block), the transcript
and the memory go back to what they were before it. An error may land inside a model call, after some layers
stored the chunk, so the memory is always restored from a snapshot, never trusted as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

from inf_llm.generation.engine import Engine, EngineSnapshot, GenerationStep
from inf_llm.generation.sampling import SamplingParams
from inf_llm.memory.retrieval_trace import Source, sources

from chat.chat_format import ChatFormat

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class TurnCancelled(Exception):
    """The user interrupted the reading of their message: the turn was rolled back, the transcript is unchanged."""


class TurnFailed(Exception):
    """An error stopped the turn; the transcript and the memory are as they were before it. `cause` is the error;
    `memory_reset`: putting the memory back failed too, so it was emptied and the next turn re-reads the transcript."""

    def __init__(self, cause: BaseException, *, memory_reset: bool = False):
        self.cause, self.memory_reset = cause, memory_reset
        lines = str(cause).strip().splitlines()
        super().__init__(f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__)


class StopRequested(Exception):
    """Raised from a progress callback to stop a feed at a chunk boundary (the memory is consistent there)."""


@dataclass
class Reply:
    text: str
    finish_reason: str  # "eos", "stop", "length" or "interrupted"
    prompt_tokens: int  # tokens fed before generating (the new message and the turn's framing)
    generated_tokens: int
    closing_tokens: int  # fed after the reply: the turn-end tokens, plus the reply again if it re-tokenised differently
    prefill_tokens_per_s: float | None
    decode_ms_per_token: float | None


@dataclass
class _Snapshot:
    num_tokens: int
    snap: EngineSnapshot


@dataclass
class Counters:
    """What the memory has read, for `!!stats` and for tests that check nothing was re-read."""

    fed_tokens: int = 0  # every token fed since this process started (prompts, re-reads, turn ends)
    generated_tokens: int = 0
    rollbacks: int = 0
    last_prefill_tokens_per_s: float | None = None
    last_decode_ms_per_token: float | None = None


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Conversation:
    """The transcript and its memory. UI-free: the front ends call `ask`, `regen`, `remove`, `reset`."""

    def __init__(self, engine: Engine, chat_format: ChatFormat, params: SamplingParams, *, max_snapshots: int = 12):
        if max_snapshots < 1:
            raise ValueError(f"max_snapshots must be >= 1, got {max_snapshots}")
        self.engine, self.format = engine, chat_format
        if chat_format.stop_strings and not params.stop_strings:
            params = replace(params, stop_strings=chat_format.stop_strings)
        self.params = params
        self.messages: list[dict] = []
        self.max_snapshots = max_snapshots
        self._snapshots: list[_Snapshot] = []
        self.counters = Counters()
        self._replies = 0
        # (position of the query that gave the last reply's first token, the ids of the reply's queries): what
        # !!sources replays
        self._last_reply: tuple[int, list[int]] | None = None
        if engine.tokens:
            raise ValueError("the engine's memory must be empty when a conversation starts; call engine.reset()")

    # --- turns ----------------------------------------------------------------------------------------------

    def ask(self, text: str, *, progress: Progress | None = None, on_step: Callable[[GenerationStep], None] | None = None,
            should_stop: Callable[[], bool] = lambda: False) -> Reply:
        """Add a user message and generate the reply.

        progress(done, total) follows the reading of the message. If it raises (e.g. StopRequested) or the
        reading is interrupted, the turn is rolled back and TurnCancelled raised. Once generating,
        should_stop() ends the reply early; it is kept as far as it got (finish_reason "interrupted"). Any error
        rolls the turn back (transcript and memory as before it) and raises TurnFailed.
        """
        with self._all_or_nothing():
            self.messages.append({"role": "user", "content": text})
            return self._respond(progress, on_step, should_stop)

    def regen(self, *, progress: Progress | None = None, on_step: Callable[[GenerationStep], None] | None = None,
              should_stop: Callable[[], bool] = lambda: False) -> Reply:
        """Replace the last reply: back to the snapshot after the last prompt (nothing re-read), then generate."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("there is no reply to regenerate")
        with self._all_or_nothing():
            self.messages.pop()
            return self._respond(progress, on_step, should_stop)

    def remove(self, progress: Progress | None = None) -> bool:
        """Remove the last exchange (the last user message and its reply); False when there is none."""
        if not self.messages:
            return False
        with self._all_or_nothing():
            if self.messages[-1]["role"] == "assistant":
                self.messages.pop()
            if self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()
            self._last_reply = None
            self._sync(self.format.render(self.messages), progress)
        return True

    def reset(self) -> None:
        self.messages.clear()
        self._snapshots.clear()
        self._last_reply = None
        self.engine.reset()

    @property
    def last_reply_tokens(self) -> int:
        """Tokens of the last reply generated in this run (0 if none): the queries `sources` replays."""
        return len(self._last_reply[1]) if self._last_reply else 0

    def sources(self, limit: int = 5) -> list[tuple[Source, str]]:
        """The passages of the conversation that retrieval brought into the last reply's attention, most attended
        first, with their text: (Source, text) pairs (see `inf_llm.memory.retrieval_trace.sources`).

        The reply is replayed with a trace attached: the memory goes back to the snapshot taken after its prompt,
        the tokens that produced the reply are fed again one at a time (as generation fed them, so retrieval
        chooses the same blocks), then the rest of the transcript; the memory ends as it was. Costs about one
        decoding of the reply, plus an attention computation per token and layer for the trace.
        """
        if self._last_reply is None or not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("there is no reply of this run to trace (a resumed session's replies cannot be)")
        if not hasattr(self.engine.memory, "start_trace"):
            raise ValueError(f"method {self.engine.config.method!r} retrieves nothing from memory: only inf-llm does")
        start, queries = self._last_reply
        tokens = list(self.engine.tokens)
        with self._all_or_nothing():
            self._sync(tokens[:start], None)  # back to the snapshot after the prompt (re-reads only if it was dropped)
            trace = self.engine.memory.start_trace()
            try:
                self._replay(queries)
            finally:
                self.engine.memory.stop_trace()
            self._sync(self.format.render(self.messages), None)
            self._push()
        found = sources(trace, since=start, limit=limit)
        return [(source, self.engine.tokenizer.decode(tokens[source.start : source.end])) for source in found]

    def load(self, messages: list[dict]) -> None:
        """Adopt a transcript whose memory was loaded into the engine (a resumed session); nothing is read.

        The memory must hold the transcript's rendering; if the tokenizer renders it differently now, the
        difference is re-read from the longest common prefix at the next turn (logged).
        """
        self.messages = [dict(m) for m in messages]
        self._snapshots.clear()
        self._last_reply = None
        expected = self.format.render(self.messages)
        if self.engine.tokens != expected:
            logger.warning("the session's memory (%d tokens) differs from its transcript's rendering (%d tokens) "
                           "after %d tokens; the rest will be re-read", len(self.engine.tokens), len(expected),
                           common_prefix_len(self.engine.tokens, expected))
        self._push()

    def recover(self) -> None:
        """After an interrupt outside the guarded sections: drop an unanswered message, restore the last snapshot."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()
        self._restore_latest()

    # --- the turn ---------------------------------------------------------------------------------------------

    def _respond(self, progress, on_step, should_stop) -> Reply:
        target = self.format.render(self.messages, add_generation_prompt=True)
        fed_before = self.counters.fed_tokens
        t0 = time.perf_counter()
        # Keep what the memory shares with the prompt, but at least its last token to feed: generate() reads the new
        # tokens as a prefill of all but the last, then the last alone (its logits give the first token).
        self._rewind(min(common_prefix_len(self.engine.tokens, target), len(target) - 1))
        new = target[len(self.engine.tokens):]
        prefilled = False
        prompt_fed = 0
        prefill_rate = None

        def at_prefilled() -> None:
            # The rollback point of !!regen (and of a Ctrl-C before the first token): the prompt but its last token.
            nonlocal prefilled, prompt_fed, prefill_rate
            prompt_fed = self.counters.fed_tokens - fed_before
            prefill_rate = prompt_fed / max(time.perf_counter() - t0, 1e-9) if prompt_fed > 1 else None
            if prefill_rate is not None:
                self.counters.last_prefill_tokens_per_s = prefill_rate  # shown while the reply streams
            self._push()
            prefilled = True

        parts: list[str] = []
        sampled: list[int] = []
        finish, decode_ms = "interrupted", None
        params = self.params
        if params.seed is not None:
            # A fixed seed per reply number: reproducible runs, yet !!regen gives another reply.
            params = replace(params, seed=params.seed + self._replies)
        self._replies += 1
        self._last_reply = None
        steps = self.engine.generate(new, params, progress=self._counting(len(new) - 1, progress),
                                     on_prefilled=at_prefilled, reread=progress)
        try:
            for step in steps:
                parts.append(step.text)
                sampled.append(step.token_id)
                decode_ms = step.decode_ms_per_token
                if on_step is not None:
                    on_step(step)
                if step.finish_reason is not None:
                    finish = step.finish_reason
                    break
                if should_stop():
                    break
        except KeyboardInterrupt:
            if not prefilled:
                raise  # Ctrl-C while reading the message drops it (`_all_or_nothing`)
            # From the prompt's last token on, the reply is kept as far as it got. A hard interrupt may land inside
            # a model call: the memory cannot be trusted past the prompt.
            self._restore_latest()
        finally:
            steps.close()
        generated = len(sampled)
        self.counters.fed_tokens += 1 + max(generated - 1, 0)  # the last prompt token, then each fed sample
        if finish != "interrupted" or generated:
            # The queries of the reply: the last prompt token, then every sample but the last (never fed). Kept as
            # ids: the transcript re-tokenises the reply's text, not always into the tokens that were sampled.
            self._last_reply = (len(target) - 1, [target[-1], *sampled[:-1]])
        self.counters.generated_tokens += generated
        self.messages.append({"role": "assistant", "content": "".join(parts)})

        fed_before_end, rollbacks_before = self.counters.fed_tokens, self.counters.rollbacks
        try:
            self._sync(self.format.render(self.messages), None)
        except KeyboardInterrupt:
            # The transcript is whole; the memory is a valid prefix of it and the next turn reads the rest.
            self._restore_latest()
        closing = self.counters.fed_tokens - fed_before_end
        if self.counters.rollbacks != rollbacks_before:
            logger.debug("the reply re-tokenised differently from the sampled tokens: re-read it (%d tokens)", closing)
        self._push()
        self.counters.last_decode_ms_per_token = decode_ms or self.counters.last_decode_ms_per_token
        reply = Reply("".join(parts), finish, prompt_fed + 1, generated, closing, prefill_rate, decode_ms)
        logger.debug("turn: fed %d prompt tokens, generated %d (%s), fed %d to close the turn; memory %d tokens",
                     prompt_fed + 1, generated, finish, closing, len(self.engine.tokens))
        return reply

    # --- all or nothing --------------------------------------------------------------------------------------

    @contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """Run a turn (or !!remove, !!sources) whole or not at all: if Ctrl-C stops the reading of a message
        (TurnCancelled) or any error stops it (TurnFailed), the transcript, the memory and the reply count go
        back to what they were before it. Ctrl-C while a reply is written is handled inside (the reply is kept)."""
        messages, tokens = [dict(m) for m in self.messages], list(self.engine.tokens)
        last_reply, replies = self._last_reply, self._replies
        try:
            yield
        except (Exception, KeyboardInterrupt) as error:
            self.messages[:] = messages
            self._last_reply, self._replies = last_reply, replies
            try:
                self._return_to(tokens, last_reply)
            except Exception as again:
                # Nothing left to restore from: empty the memory, which the next turn re-reads (costly, but right).
                logger.error("could not put the memory back after %r: %r; it was emptied", error, again)
                self._snapshots.clear()
                self.engine.reset()
                raise TurnFailed(error, memory_reset=True) from again
            if isinstance(error, (KeyboardInterrupt, StopRequested)):
                raise TurnCancelled() from None
            logger.debug("turn failed and was rolled back", exc_info=error)
            raise TurnFailed(error) from error

    def _return_to(self, tokens: list[int], last_reply: tuple[int, list[int]] | None) -> None:
        """Make the memory hold `tokens` again, as it did before an abandoned turn.

        Always from a snapshot: an error inside a model call leaves part of a chunk stored in some layers, which
        `engine.tokens` does not show. When that lands at the prompt of the last reply (an abandoned !!regen or
        !!sources), the reply is fed again as its generation fed it, one query at a time, then the rest as the
        turn's end did: the memory is then bit-for-bit what it was (a read in chunks would round differently).
        """
        self._rollback(len(tokens))
        if last_reply is not None:
            start, queries = last_reply
            if len(self.engine.tokens) == start < len(tokens) and tokens[start] == queries[0]:
                self._replay(queries)
        self._sync(tokens, None)

    def _replay(self, queries: list[int]) -> None:
        """Feed the queries of a reply one at a time, as `Engine.generate` fed them."""
        for token in queries:
            self.engine.feed([token])
            self.counters.fed_tokens += 1

    # --- memory <-> transcript ---------------------------------------------------------------------------------

    def _sync(self, target: list[int], progress: Progress | None) -> None:
        """Make the memory hold exactly `target`: keep the common prefix, roll back past it if needed, feed the rest."""
        self._rewind(common_prefix_len(self.engine.tokens, target))
        todo = target[len(self.engine.tokens):]
        if todo:
            self.engine.feed(todo, progress=self._counting(len(todo), progress))

    def _rewind(self, keep: int) -> None:
        """Keep at most the first `keep` tokens of the memory (rolling back to a snapshot when it holds more)."""
        if keep < len(self.engine.tokens):
            self._rollback(keep)

    def _counting(self, total: int, progress: Progress | None) -> Progress:
        """A feed's progress callback that counts the tokens fed; shows the bar (0 of total) before the first
        chunk, which may take seconds, when there is anything to read."""
        done = 0

        def counting(n: int, total: int) -> None:
            nonlocal done
            self.counters.fed_tokens += n - done
            done = n
            if progress is not None:
                progress(n, total)

        if total > 0:
            counting(0, total)
        return counting

    def _rollback(self, keep: int) -> None:
        """Return to the latest snapshot holding at most `keep` tokens of the current history (or to empty)."""
        while self._snapshots and self._snapshots[-1].num_tokens > keep:
            self._snapshots.pop()
        self.counters.rollbacks += 1
        if self._snapshots:
            self.engine.restore(self._snapshots[-1].snap)
        else:
            self.engine.reset()
        logger.debug("rolled back to %d tokens (wanted %d)", len(self.engine.tokens), keep)

    def _restore_latest(self) -> None:
        """After an interrupted feed or generation: back to the last consistent point."""
        self._rollback(len(self.engine.tokens))

    def _push(self) -> None:
        n = len(self.engine.tokens)
        if self._snapshots and self._snapshots[-1].num_tokens == n:
            self._snapshots.pop()
        self._snapshots.append(_Snapshot(n, self.engine.snapshot()))
        if len(self._snapshots) > self.max_snapshots:
            del self._snapshots[0]

    @property
    def snapshot_points(self) -> list[int]:
        """Token counts of the kept rollback points (for tests and `!!stats`)."""
        return [s.num_tokens for s in self._snapshots]
