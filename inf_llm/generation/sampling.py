"""Next-token sampling through transformers' logits processors, and the defaults a model's generation config sets.

`sample_next` applies, in the order `transformers`' `generate` does, `RepetitionPenaltyLogitsProcessor`,
`TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper`, each only when its setting is not the
neutral one, then samples from the softmax (or takes the argmax at temperature 0: the penalty still applies, as
with transformers' `do_sample=False`). One difference, on purpose: the repetition penalty is given, as the ids it
penalises, only the reply's tokens that the reply has used more often than the conversation before it contains
them (`RepeatCounter`), not every token of the context as transformers' default does, nor every token of the reply
(its `prompt_ignore_length`): a chat's context is the whole conversation, pasted documents included, and an answer
must be free to quote it (a pass key's repeated digits, a name), while a reply that says its own new words again
and again ("Bonjour! (Bonjour!)" five times) is what the penalty is for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# The sampling settings a model's generation config may set (transformers' names; ours are the same).
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    repetition_penalty: float = 1.0  # on the reply's own tokens (see the module's docstring)
    max_new_tokens: int = 512
    # The reply's first min_new_tokens tokens are never an end-of-sequence token (the engine's eos ids masked),
    # as transformers' `min_new_tokens`: 1 means no reply ends before its first token.
    min_new_tokens: int = 0
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0 or math.isinf(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                             f"got {self.min_new_tokens}")


# The chat's defaults, where neither a flag nor the model's generation config sets a value: the embedded model's.
# `python -m inf_llm.bench loops` (BENCHMARKS.md): temperature 0.7 alone loops on 2 of 16 everyday first chats,
# greedy decoding on 4 of 8; with a penalty of 1.2 on repeats beyond the context's own count (`RepeatCounter`),
# none of 16 (none of 8 greedy). A penalty on every repeat of the reply's own tokens ended the loops too but broke
# the answers the product exists for (0 of 3 prose needles at 4K: "5937." for 5937913); the counted one answers them.
# min_new_tokens 1: a reply never ends before its first token. On long documents the retrieved memory can make the
# end of the turn the likeliest first token (12 of the preset's 177 prose benchmark replies were empty, full
# attention's none of 138); the next likeliest answers most of them, and no other reply changes.
CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.2, "min_new_tokens": 1}


def generation_config_defaults(generation_config) -> dict:
    """The sampling settings a model's generation config sets (`GENERATION_CONFIG_FIELDS`), by our field names.

    transformers 5 leaves every unset field None, so only what the checkpoint's generation_config.json says counts,
    read as transformers' `generate` reads it: `do_sample: true` samples with transformers' defaults for the fields
    it leaves unset (top-k 50, temperature 1, ...); `do_sample: false` is greedy decoding (temperature 0). Fields
    set without do_sample are taken as given (transformers would decode greedily and warn that they are unused).
    """
    if generation_config is None:
        return {}
    found = {name: getattr(generation_config, name, None) for name in GENERATION_CONFIG_FIELDS}
    found = {name: value for name, value in found.items() if value is not None}
    do_sample = getattr(generation_config, "do_sample", None)
    if do_sample is True:
        defaults = type(generation_config)._get_default_generation_params()
        found = {**{name: defaults[name] for name in GENERATION_CONFIG_FIELDS}, **found}
    elif do_sample is False:
        found["temperature"] = 0.0
    if "top_k" in found:
        found["top_k"] = int(found["top_k"])
    for name in ("temperature", "top_p", "repetition_penalty"):
        if name in found:
            found[name] = float(found[name])
    return found


def resolve_params(generation_config=None, **given) -> tuple[SamplingParams, dict[str, str]]:
    """SamplingParams from, in order of precedence: `given` (values not None: the command line's flags), the model's
    generation config, `CHAT_DEFAULTS` (then SamplingParams' own, for the other fields). Also returns where each
    of GENERATION_CONFIG_FIELDS came from: "flag", "model" (its generation config) or "default"."""
    given = {name: value for name, value in given.items() if value is not None}
    unknown = set(given) - {f.name for f in fields(SamplingParams)}
    if unknown:
        raise TypeError(f"unknown sampling settings: {', '.join(sorted(unknown))}")
    model = generation_config_defaults(generation_config)
    origin = {name: "flag" if name in given else "model" if name in model else "default"
              for name in GENERATION_CONFIG_FIELDS}
    return SamplingParams(**{**CHAT_DEFAULTS, **model, **given}), origin


class RepeatCounter:
    """The reply's tokens the repetition penalty applies to: those the reply has used more often than the context.

    context: every token id before the reply (the conversation in memory, this turn's prompt included). A token
    the context holds n times may come n times in the reply unpenalised (a quoted number keeps its repeated
    digits, a quoted name its words); the (n+1)-th use makes it penalised from then on, once, as transformers'
    processor penalises each id it is given once however often it comes.
    """

    def __init__(self, context: list[int]):
        self._context = torch.bincount(torch.tensor(context, dtype=torch.long)).tolist() if context else []
        self._counts: dict[int, int] = {}
        self._over: list[int] = []

    def add(self, token_id: int) -> None:
        count = self._counts.get(token_id, 0) + 1
        self._counts[token_id] = count
        allowed = self._context[token_id] if token_id < len(self._context) else 0
        if count == allowed + 1:
            self._over.append(token_id)

    def penalised(self) -> torch.Tensor:
        """1-D ids for `process_logits`' `previous`."""
        return torch.tensor(self._over, dtype=torch.long)


def logits_processors(params: SamplingParams) -> LogitsProcessorList:
    """transformers' processors for params, in `generate`'s order; the warpers only when sampling (temperature > 0).

    The repetition penalty is given the reply's tokens as its input ids (see the module's docstring)."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
    if params.temperature > 0:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(params.temperature)))
        if params.top_k:
            processors.append(TopKLogitsWarper(int(params.top_k)))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(float(params.top_p)))
    return processors


def process_logits(logits: torch.Tensor, params: SamplingParams, previous: torch.Tensor,
                   processors: LogitsProcessorList | None = None) -> torch.Tensor:
    """The scores the next token is drawn from (V,) float32: logits (V,) through the processors; `previous` (1-D ids)
    is what the repetition penalty penalises (the engine passes `RepeatCounter.penalised()`). Masked tokens are -inf."""
    processors = logits_processors(params) if processors is None else processors
    scores = logits.float()
    if not processors:
        return scores
    if previous.numel() == 0:
        # Nothing to penalise yet: skip the penalty (transformers' scatter over no ids would return the same).
        processors = [p for p in processors if not isinstance(p, RepetitionPenaltyLogitsProcessor)]
    ids = previous.to(device=scores.device, dtype=torch.long)[None]
    scores = scores[None]
    for processor in processors:
        scores = processor(ids, scores)
    return scores[0]


def sample_next(logits: torch.Tensor, params: SamplingParams, previous: torch.Tensor, generator: torch.Generator | None,
                processors: LogitsProcessorList | None = None) -> int:
    """One token id from the last position's logits (V,); previous: the ids to penalise (see `process_logits`)."""
    scores = process_logits(logits, params, previous, processors)
    if params.temperature == 0:
        return int(torch.argmax(scores))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
