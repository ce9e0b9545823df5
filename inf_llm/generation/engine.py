"""The generation API: a model, its context memory, and the tokens fed so far.

`Engine.generate` is a generator of `GenerationStep`s (token, text delta, memory statistics, timings). The
memory persists across calls: each call feeds only its new tokens, so a conversation is read once.
Prefill goes in chunks with logits for the last position only (`logits_to_keep=1`); a prompt's last token is fed
alone, as each sampled token is. Sampling goes through transformers' logits processors (`sampling.py`); the text
is decoded incrementally and cut at stop strings by one path (`IncrementalDecoder`, `StopStrings`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from inf_llm.config.schema import InfLLMConfig
from inf_llm.generation.decoding import IncrementalDecoder, StopStrings
from inf_llm.generation.host_memory import release_free_memory
from inf_llm.generation.sampling import RepeatCounter, SamplingParams, logits_processors, sample_next
from inf_llm.memory.attach import attach
from inf_llm.memory.full_attention import attention_kernels
from inf_llm.memory.stats import MemoryStats
from inf_llm.model.placement import execution_device


@dataclass(frozen=True)
class GenerationStep:
    token_id: int
    text: str  # text added by this step (held back while it could still become a stop string)
    finish_reason: str | None  # None while generating, else "eos", "stop" or "length"
    memory: MemoryStats
    prefill_tokens_per_s: float | None  # of the prompt fed by this call
    decode_ms_per_token: float | None  # mean over this call's generated tokens


@dataclass(frozen=True)
class EngineSnapshot:
    num_tokens: int
    memory: object
    short: bool = False  # taken while the conversation had its short_conversation settings
    num_feeds: int = 0


class Engine:
    """One conversation's worth of model + memory. Not thread-safe; batch size 1."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: InfLLMConfig, *, prefill_chunk: int = 2048):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.prefill_chunk = prefill_chunk
        # short_conversation: the memory has those settings until a prompt ends past short_conversation_until
        # tokens (`expect`); `feeds` (each feed's length while short) is how it was read, to read it again.
        self.short = config.short_conversation is not None
        self.memory = attach(model, self.memory_config)
        self.feeds: list[int] = []
        self._attn_implementation = model.config._attn_implementation
        # Where the input ids go: the embedding's execution device (its weights may sit on "meta" when offloaded).
        self.device = execution_device(model.get_input_embeddings())
        self.tokens: list[int] = []
        self.eos_token_ids = _eos_ids(model, tokenizer)

    # --- the settings of a short conversation -------------------------------------------------------------------

    @property
    def memory_config(self) -> InfLLMConfig:
        """The settings the memory has now: short_conversation's while the conversation is short."""
        return self.config.short_config() if self.short else self.config.long_config()

    def expect(self, num_tokens: int, reread: Callable[[int, int], None] | None = None) -> bool:
        """Called before a prompt of `num_tokens` tokens is read: if the conversation then ends past
        short_conversation_until, it leaves its short_conversation settings: a memory with the config's own is
        built, and the conversation so far is read into it again, feed by feed as it was read, so that the memory is
        exactly what those settings alone would hold. Returns whether that happened (a pause: the tokens so far are
        read again, a reply's token by token; reread(done, total) follows it, feed by feed)."""
        if not self.short or len(self.tokens) + num_tokens <= self.config.short_conversation_until:
            return False
        self._rebuild(False, len(self.tokens), len(self.feeds), reread)
        return True

    def _rebuild(self, short: bool, num_tokens: int, num_feeds: int,
                 reread: Callable[[int, int], None] | None = None) -> None:
        """A new memory with the short (or the config's own) settings, holding the first `num_feeds` feeds again.
        All or nothing: if the reading stops (an exception, e.g. from `reread`), the engine is as it was."""
        tokens, feeds = self.tokens[:num_tokens], self.feeds[:num_feeds]
        if sum(feeds) != len(tokens):
            raise AssertionError(f"the feeds hold {sum(feeds)} tokens, the conversation {len(tokens)}")
        before = self.memory, self.short, self.tokens, self.feeds
        self.short = short
        self.memory = attach(self.model, self.memory_config)
        self.tokens, self.feeds = [], []
        try:
            start = 0
            for length in feeds:
                self.feed(tokens[start : start + length])
                start += length
                if reread is not None:
                    reread(start, len(tokens))
        except BaseException:
            discard_memory(self.memory)
            self.memory, self.short, self.tokens, self.feeds = before
            raise
        if not short:
            self.feeds = feeds  # the short part's feeds, which a rollback into it reads again
        discard_memory(before[0])

    # --- feeding ----------------------------------------------------------------------------------------------

    # no_grad rather than inference_mode: memory tensors must stay writable by restore() outside it.
    @torch.no_grad()
    def feed(self, token_ids: Sequence[int], progress: Callable[[int, int], None] | None = None, *,
             on_logits: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Add tokens to the memory; return the logits (V,) float32 after the last one.

        progress(done, total) is called after each prefill chunk. on_logits(start, logits), when given, receives
        each chunk's logits at every position, (chunk length, V) in the model's dtype, `start` being the chunk's
        offset in token_ids (scoring a text, as the lm-eval model does); otherwise only the last position's are
        computed. With prompt_end_blocks, the last chunk_size tokens of a feed of more than one are read by
        themselves, once for votes (once per round, prompt_end_rounds) and again to stay (each piece's logits are
        those of the last reading). If interrupted (e.g. KeyboardInterrupt), the memory is left mid-chunk: callers
        restore a snapshot taken before (the chat does).
        """
        if len(token_ids) == 0:
            raise ValueError("feed() needs at least one token")
        if len(token_ids) > 1:
            self.expect(len(token_ids))
        if self.model.config._attn_implementation != self._attn_implementation:
            # Another engine switched this model's attention; take it back.
            self.model.set_attn_implementation(self._attn_implementation)
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=self.device)
        logits = None
        if len(ids) > 1 and self.config.method != "full":
            self.memory.begin_prompt(len(ids))  # decode_memory_distance_from: the reply's steps know its length
        # prompt_end_blocks: the last chunk_size tokens of a prompt are read by themselves, twice (votes, then the
        # reading that stays: `InfLLMMemory.vote_prompt_end`); a new prompt ends what the last one's votes chose.
        votes = self.config.method == "inf-llm" and self.config.prompt_end_blocks > 0 and len(ids) > 1
        starts = list(range(0, len(ids), self.prefill_chunk))
        if votes:
            self.memory.clear_prompt_end()
            end = max(0, len(ids) - self.config.chunk_size)
            starts = [start for start in starts if start < end] + [end]
        with attention_kernels(self.device):
            for start, stop in zip(starts, starts[1:] + [len(ids)]):
                chunk = ids[start:stop][None]
                if votes and stop == len(ids):
                    self.memory.vote_prompt_end(lambda: self.model(
                        input_ids=chunk, logits_to_keep=1, **self.memory.forward_kwargs(chunk.shape[1], self.device)))
                out = self.model(input_ids=chunk, logits_to_keep=0 if on_logits else 1,
                                 **self.memory.forward_kwargs(chunk.shape[1], self.device))
                if on_logits is not None:
                    on_logits(start, out.logits[0])
                logits = out.logits[0, -1].float()
                self.tokens.extend(chunk[0].tolist())
                if progress is not None:
                    progress(stop, len(ids))
        if self.short:  # only a conversation's short part is ever read again
            self.feeds.append(len(ids))
        if len(ids) > 1:
            release_free_memory()  # the read's temporaries, kept by the allocator otherwise (host_memory.py)
        return logits

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
                 progress: Callable[[int, int], None] | None = None,
                 on_prefilled: Callable[[], None] | None = None,
                 reread: Callable[[int, int], None] | None = None) -> Iterator[GenerationStep]:
        """Feed prompt_ids (all the new tokens of the turn), then sample until EOS (never among the first
        params.min_new_tokens tokens), a stop string or max_new_tokens.

        The prompt is read in two parts: all but its last token as a prefill (chunked; progress(done, total) after
        each chunk, as `feed`), then the last token alone, as each sampled token is fed, which gives the first
        token's logits. on_prefilled() is called between the two: a snapshot taken there can regenerate the reply
        by feeding the last prompt token again (the chat's !!regen). The last sampled token (e.g. the EOS) is
        returned but not fed: the caller feeds what its transcript says comes next, which keeps the memory
        token-exact with the transcript. If the prompt ends a short conversation past its limit
        (short_conversation), the conversation so far is read again first (`expect`; reread(done, total)).

        Each step's text is decoded incrementally (a few tokens per step, `IncrementalDecoder`); the texts of all
        steps add up to `tokenizer.decode(reply ids, skip_special_tokens=True)`, cut before the first stop string.
        """
        prompt_ids = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        if not prompt_ids:
            raise ValueError("generate() needs at least one prompt token")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(params.seed)
        processors = logits_processors(params)
        penalise = params.repetition_penalty != 1.0
        self.expect(len(prompt_ids), reread)  # the prompt's two feeds below are read under the same settings
        t0 = time.perf_counter()
        if len(prompt_ids) > 1:
            self.feed(prompt_ids[:-1], progress)
        callback_s = 0.0
        if on_prefilled is not None:
            t1 = time.perf_counter()
            on_prefilled()
            callback_s = time.perf_counter() - t1
        logits = self.feed(prompt_ids[-1:])
        repeats = RepeatCounter(self.tokens) if penalise else None
        prefill_rate = len(prompt_ids) / max(time.perf_counter() - t0 - callback_s, 1e-9)
        generated: list[int] = []
        decoder = IncrementalDecoder(self.tokenizer)
        stops = StopStrings(params.stop_strings)
        decode_time, decoded = 0.0, 0
        end_ids = sorted(self.eos_token_ids)  # masked for the first params.min_new_tokens tokens
        while True:
            previous = repeats.penalised() if repeats is not None else _NO_TOKENS
            logits = logits.cpu()
            if len(generated) < params.min_new_tokens and end_ids:
                logits = logits.clone()  # .cpu() of CPU logits is the engine's own tensor
                logits[..., end_ids] = -torch.inf
            token = sample_next(logits, params, previous, generator, processors)
            generated.append(token)
            if repeats is not None:
                repeats.add(token)
            text = decoder.push(token)
            finish = "eos" if token in self.eos_token_ids else None
            if finish is None and len(generated) >= params.max_new_tokens:
                finish = "length"
            if finish is not None:
                text += decoder.finish()
            text, stopped = stops.push(text)
            if stopped:
                finish = "stop"
            elif finish is not None:
                text += stops.flush()
            ms = 1000 * decode_time / decoded if decoded else None
            yield GenerationStep(token, text, finish, self.memory.stats(), prefill_rate, ms)
            if finish:
                return
            t1 = time.perf_counter()
            logits = self.feed([token])
            decode_time += time.perf_counter() - t1
            decoded += 1

    # --- state ------------------------------------------------------------------------------------------------

    def snapshot(self) -> EngineSnapshot:
        return EngineSnapshot(len(self.tokens), self.memory.snapshot(), self.short, len(self.feeds))

    def restore(self, snap: EngineSnapshot) -> None:
        """Back to the snapshot's state. One taken while the conversation was short, restored once it is long, reads
        the conversation up to the snapshot again with the short settings (the snapshot's memory was of those)."""
        if snap.short != self.short:
            self._rebuild(short=snap.short, num_tokens=snap.num_tokens, num_feeds=snap.num_feeds)
            return
        self.memory.restore(snap.memory)
        del self.tokens[snap.num_tokens :]
        del self.feeds[snap.num_feeds :]

    def reset(self) -> None:
        short = self.config.short_conversation is not None  # a new conversation is short again
        if short != self.short:
            self._use(short)
        else:
            self.memory.reset()
        self.tokens.clear()
        self.feeds.clear()

    def stats(self) -> MemoryStats:
        return self.memory.stats()

    def state_dict(self) -> dict:
        return {"tokens": list(self.tokens), "memory": self.memory.state_dict(), **self.regime_state()}

    def regime_state(self) -> dict:
        """What a saved state adds to tokens and memory: whether the conversation is short, and its feeds."""
        return {"short": self.short, "feeds": list(self.feeds)}

    def enter_regime(self, state: dict) -> None:
        """Before a saved state is loaded: the memory with the settings it was saved under (a state saved without
        short_conversation, or before it existed, holds the config's own settings' memory)."""
        short = bool(state.get("short", False))
        if short and self.config.short_conversation is None:
            raise ValueError("the state was saved while its conversation had short_conversation settings, which "
                             "this config does not have")
        if short != self.short:
            self._use(short)

    def _use(self, short: bool) -> None:
        """An empty memory with the short (or the config's own) settings in place of the one in use."""
        old, self.short = self.memory, short
        self.memory = attach(self.model, self.memory_config)
        discard_memory(old)

    def load_state_dict(self, state: dict) -> None:
        self.enter_regime(state)
        self.memory.load_state_dict(state["memory"])
        self.tokens = list(state["tokens"])
        self.feeds = list(state.get("feeds", []))


def discard_memory(memory) -> None:
    """A memory the engine no longer uses: it forgets the disk tiers it read (a resumed session's, which must stay as
    saved) without writing to them, and removes a private copy of them (full attention's memory has neither)."""
    if getattr(memory, "layers", None) is None:
        return
    memory.forget_saved()
    copy, memory.private_copy = memory.private_copy, None
    memory.remove_copy(copy)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


_NO_TOKENS = torch.empty(0, dtype=torch.long)
