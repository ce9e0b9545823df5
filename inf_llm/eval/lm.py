"""The lm-eval model `inf-llm`: lm-evaluation-harness requests answered by our `Engine` (a model + InfLLM memory).

Importing this module registers the name `inf-llm` with lm-eval (`lm_eval.api.registry.register_model`);
`python -m inf_llm.eval` does that and then runs lm-eval's command line. Model arguments (`--model_args`):

    pretrained       checkpoint folder or .gguf file (default: the config file's `model_path`, else the embedded
                     SmolLM2-135M-Instruct), loaded as the chat loads it (`inf_llm.model.loading.load_model`)
    inf_llm_config   preset name (`smollm2-full`) or YAML file, ours or the reference's (default: the model's preset)
    device           cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)
    dtype            float32, bfloat16, float16 or auto (default: float32 on CPU, bfloat16 on CUDA)
    prefill_chunk    tokens per model call while reading (default 2048, as the chat and the benchmarks)
    max_gen_toks     generate_until's token budget when a task gives none (default 256, as lm-eval's `hf`)
    add_bos_token, prefix_token_id   as lm-eval's `hf` model
    any InfLLMConfig field, e.g. topk_blocks=8: overrides the config's value

How each request type reads its text (batch size 1, one request at a time, every request from an empty memory;
nothing is ever truncated):

- `loglikelihood(context, continuation)`: the context is read as the chat reads a message (`Engine.feed`, in
  `prefill_chunk` pieces); its last logits score the continuation's first token, and the rest of the continuation
  is read as one more piece, with the logits of every position kept. Requests that share a context read it once:
  the memory is restored to a snapshot taken after it, which gives what reading it again would (the continuation
  is its own piece either way).
- `loglikelihood_rolling(text)`: the text's tokens conditioned on the prefix token (BOS, else EOS), as lm-eval's
  `hf` model scores them, read through the memory in `prefill_chunk` pieces: one pass, every token scored once.
- `generate_until(context, gen_kwargs)`: the prompt is read as the chat and `python -m inf_llm.bench prose` read
  it (`Engine.generate`: all but its last token as a prefill, then the last one as a decoding step), until EOS, a stop
  sequence (`until`) or `max_gen_toks`; the reply is the decoded tokens cut before the first stop sequence.

With a window that covers the whole input (or `inf_llm_config=smollm2-full`, the model's own attention) the
log-likelihoods equal lm-eval's `hf` model's to float32 rounding (tests/test_lm_eval.py).

Chat templates (`--apply_chat_template`) are the tokenizer's, as for lm-eval's `hf` model; a fastchat
`conv_template` named by the config file is not used here (a warning says so).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for, preset_path
from inf_llm.config.schema import InfLLMConfig
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from inf_llm.model.loading import embedded_gguf_path, load_model
from inf_llm.storage.dtypes import DTYPES

logger = logging.getLogger(__name__)

MODEL_NAME = "inf-llm"
_MODEL_DTYPES = ("float32", "bfloat16", "float16")  # of the model's weights (`DTYPES` names them)
_FIELDS = {field.name for field in dataclasses.fields(InfLLMConfig)}
# Rows of logits turned into log-probabilities at once (a 2048-token piece of a 49K vocabulary is 400 MB in float32).
_LOGPROB_ROWS = 256
# Sampling settings of a generate_until request that we honour (after lm-eval's normalize_gen_kwargs).
_SAMPLING_KEYS = {"do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed"}


def load_settings(spec: str | None):
    """A preset name or a YAML path (ours or the reference's) -> `inf_llm.config.schema.LoadedConfig`, or None."""
    if spec is None:
        return None
    text = str(spec)
    path = Path(text).expanduser()
    loaded = load_config(path if path.exists() or text.endswith((".yaml", ".yml")) else preset_path(text))
    for note in loaded.notes:
        logger.warning("%s: %s", text, note)
    return loaded


def _device(device: str | None) -> str:
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        # lm-eval's command line passes --device's default, cuda:0, to every model; its `hf` model then falls back.
        logger.warning("device %r is not available here (no CUDA): using cpu", device)
        return "cpu"
    return str(device)


@register_model(MODEL_NAME)
class InfLLMEvalLM(TemplateLM):
    """lm-eval's `TemplateLM` over one `Engine`; see the module's docstring for the arguments."""

    def __init__(self, pretrained: str | None = None, inf_llm_config: str | None = None, device: str | None = None,
                 dtype: str | None = None, prefill_chunk: int = 2048, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 batch_size: int | str | None = 1, max_batch_size: int | None = None, **overrides: Any) -> None:
        super().__init__()
        unknown = sorted(set(overrides) - _FIELDS)
        if unknown:
            raise ValueError(f"unknown inf-llm model argument(s) {', '.join(unknown)}: give pretrained, "
                             "inf_llm_config, device, dtype, prefill_chunk, max_gen_toks, add_bos_token, "
                             f"prefix_token_id or an InfLLMConfig field ({', '.join(sorted(_FIELDS))})")
        if batch_size not in (None, 1, "1"):
            logger.warning("inf-llm reads one request at a time: batch_size=%r changes nothing", batch_size)
        if dtype not in (None, "auto") and dtype not in _MODEL_DTYPES:
            raise ValueError(f"dtype={dtype!r} is invalid: give float32, bfloat16, float16 or auto")
        loaded = load_settings(inf_llm_config)
        model_path = pretrained if pretrained is not None else (loaded.model_path if loaded else None)
        model, tokenizer = load_model(model_path, device=_device(device), dtype=DTYPES.get(dtype))
        if loaded is not None:
            config = loaded.config
            if loaded.conv_template is not None:
                logger.warning("%s names the fastchat template %r: lm-eval's --apply_chat_template uses the "
                               "tokenizer's chat template instead", inf_llm_config, loaded.conv_template)
        else:
            config = load_config(default_preset_for(None if model_path is None else model.config.model_type)).config
        if overrides:
            config = config.replace(**overrides)
        self.engine = Engine(model, tokenizer, config, prefill_chunk=int(prefill_chunk))
        self.tokenizer = tokenizer
        self.model_id = f"embedded:{embedded_gguf_path().name}" if model_path is None else str(model_path)
        self._device = self.engine.device
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        logger.info("inf-llm: %s with %s", self.model_id, config)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> InfLLMEvalLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> InfLLMEvalLM:
        """--model_args win over the command line's own settings: lm-eval passes --device's default (cuda:0)
        along with them, and `device=cpu` in --model_args must not collide with it."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # --- what lm-eval asks of a TemplateLM ----------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context stands for: as lm-eval's `hf` model, BOS if the tokenizer has one, else EOS."""
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids as lm-eval's `hf` model encodes them (no special tokens added to a string that starts with the
        prefix token's text, e.g. a chat-templated prompt that starts with BOS)."""
        if add_special_tokens is None:
            if string.startswith(self.tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
            else:
                add_special_tokens = self.add_bos_token
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "inf_llm_config": self.engine.config.to_dict(),
                "prefill_chunk": self.engine.prefill_chunk}

    # --- log-likelihoods ----------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) | None, context ids, continuation ids); results in their order."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context_ids, continuation_ids) in enumerate(requests):
            if not context_ids or not continuation_ids:
                raise ValueError(f"loglikelihood request {index} has an empty context or continuation after "
                                 f"tokenisation: {requests[index][0]!r}")
            groups.setdefault(tuple(context_ids), []).append(index)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="inf-llm loglikelihood")
        for context_ids, members in groups.items():
            started = time.perf_counter()
            self.engine.reset()
            first_logits = self.engine.feed(list(context_ids))
            snapshot = self.engine.snapshot() if len(members) > 1 else None
            for turn, index in enumerate(members):
                if turn:
                    self.engine.restore(snapshot)
                request, _, continuation_ids = requests[index]
                answer = self._score_continuation(first_logits, list(continuation_ids))
                results[index] = answer
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
            bar.update(len(members))
            logger.info("loglikelihood: %d requests on a context of %d tokens in %.1f s", len(members),
                        len(context_ids), time.perf_counter() - started)
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for index, request in enumerate(tqdm(requests, disable=disable_tqdm, desc="inf-llm loglikelihood_rolling")):
            (string,) = request.args
            started = time.perf_counter()
            token_ids = self.tok_encode(string)
            total = 0.0
            if token_ids:  # an empty text has probability 1 (lm-eval's `hf` model scores no window for it)
                self.engine.reset()
                first_logits = self.engine.feed([self.prefix_token_id])
                total, _ = self._score_continuation(first_logits, token_ids)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            logger.info("loglikelihood_rolling: %d of %d requests (%d tokens, %.1f s)", index + 1, len(requests),
                        len(token_ids), time.perf_counter() - started)
        return results

    def _score_continuation(self, first_logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        """(sum of log-probabilities, every token the argmax) of `continuation`, the memory holding what precedes it
        and `first_logits` (V,) being the logits after it. Reads continuation[:-1] into the memory."""
        log_probs = torch.log_softmax(first_logits.float(), dim=-1)
        total = float(log_probs[continuation[0]])
        greedy = int(log_probs.argmax()) == continuation[0]
        if len(continuation) > 1:
            rest, rest_greedy = self._read_and_score(continuation[:-1], continuation[1:])
            total, greedy = total + rest, greedy and rest_greedy
        return total, greedy

    def _read_and_score(self, token_ids: list[int], targets: list[int]) -> tuple[float, bool]:
        """Read token_ids into the memory (`Engine.feed`, keeping the logits of every position): (sum of
        log p(targets[i] | ... token_ids[i]), every target the argmax)."""
        total, greedy = 0.0, True

        def score(start: int, logits: torch.Tensor) -> None:
            nonlocal total, greedy
            wanted = torch.tensor(targets[start : start + logits.shape[0]], dtype=torch.long, device=logits.device)
            for row in range(0, logits.shape[0], _LOGPROB_ROWS):
                log_probs = torch.log_softmax(logits[row : row + _LOGPROB_ROWS].float(), dim=-1)
                these = wanted[row : row + _LOGPROB_ROWS]
                total += float(log_probs.gather(-1, these[:, None]).double().sum())
                greedy = greedy and bool((log_probs.argmax(dim=-1) == these).all())

        self.engine.feed(token_ids, on_logits=score)
        return total, greedy

    # --- generation ---------------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        results = []
        for index, request in enumerate(tqdm(requests, disable=disable_tqdm, desc="inf-llm generate_until")):
            context, gen_kwargs = request.args
            params, stops = self._sampling(gen_kwargs, eos_text)
            started = time.perf_counter()
            prompt = self.tok_encode(context) or [self.prefix_token_id]
            self.engine.reset()
            reply_ids = [step.token_id for step in self.engine.generate(prompt, params)]
            reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
            for stop in stops:
                if stop:
                    reply = reply.split(stop)[0]
            results.append(reply)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), reply)
            logger.info("generate_until: %d of %d requests (%d prompt tokens, %d generated, %.1f s)", index + 1,
                        len(requests), len(prompt), len(reply_ids), time.perf_counter() - started)
        return results

    def _sampling(self, gen_kwargs: dict, eos_text: str) -> tuple[SamplingParams, list[str]]:
        """lm-eval's generation kwargs -> (SamplingParams, stop sequences), as lm-eval normalises them for `hf`."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        stops = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_new_tokens = int(kwargs.pop("max_gen_toks"))
        unknown = sorted(set(kwargs) - _SAMPLING_KEYS)
        if unknown:
            raise ValueError(f"generation kwargs {', '.join(unknown)} are not supported by inf-llm (supported: until, "
                             f"max_gen_toks and its aliases, {', '.join(sorted(_SAMPLING_KEYS))})")
        sample = bool(kwargs.get("do_sample"))
        return SamplingParams(
            temperature=float(kwargs.get("temperature") or 0.0) if sample else 0.0,
            top_p=float(kwargs.get("top_p") if kwargs.get("top_p") is not None else 1.0),
            top_k=int(kwargs.get("top_k") or 0),
            repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
            max_new_tokens=max_new_tokens,
            stop_strings=tuple(stop for stop in stops if stop),
            seed=None if kwargs.get("seed") is None else int(kwargs["seed"]),
        ), stops
