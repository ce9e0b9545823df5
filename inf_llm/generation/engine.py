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


class Engine:
    """One conversation's worth of model + memory. Not thread-safe; batch size 1."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: InfLLMConfig, *, prefill_chunk: int = 2048):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.prefill_chunk = prefill_chunk
        self.memory = attach(model, config)
        self._attn_implementation = model.config._attn_implementation
        # Where the input ids go: the embedding's execution device (its weights may sit on "meta" when offloaded).
        self.device = execution_device(model.get_input_embeddings())
        self.tokens: list[int] = []
        self.eos_token_ids = _eos_ids(model, tokenizer)

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
        if self.model.config._attn_implementation != self._attn_implementation:
            # Another engine switched this model's attention; take it back.
            self.model.set_attn_implementation(self._attn_implementation)
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=self.device)
        logits = None
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
        if len(ids) > 1:
            release_free_memory()  # the read's temporaries, kept by the allocator otherwise (host_memory.py)
        return logits

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
                 progress: Callable[[int, int], None] | None = None,
                 on_prefilled: Callable[[], None] | None = None) -> Iterator[GenerationStep]:
        """Feed prompt_ids (all the new tokens of the turn), then sample until EOS (never among the first
        params.min_new_tokens tokens), a stop string or max_new_tokens.

        The prompt is read in two parts: all but its last token as a prefill (chunked; progress(done, total) after
        each chunk, as `feed`), then the last token alone, as each sampled token is fed, which gives the first
        token's logits. on_prefilled() is called between the two: a snapshot taken there can regenerate the reply
        by feeding the last prompt token again (the chat's !!regen). The last sampled token (e.g. the EOS) is
        returned but not fed: the caller feeds what its transcript says comes next, which keeps the memory
        token-exact with the transcript.

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
        return EngineSnapshot(len(self.tokens), self.memory.snapshot())

    def restore(self, snap: EngineSnapshot) -> None:
        self.memory.restore(snap.memory)
        del self.tokens[snap.num_tokens :]

    def reset(self) -> None:
        self.memory.reset()
        self.tokens.clear()

    def stats(self) -> MemoryStats:
        return self.memory.stats()

    def state_dict(self) -> dict:
        return {"tokens": list(self.tokens), "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
        self.tokens = list(state["tokens"])


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


_NO_TOKENS = torch.empty(0, dtype=torch.long)
