"""The long read: one document of up to a million tokens, read once under a RAM budget, keys at several depths.

The document is the passkey benchmark's filler (`prompt.py`) with one numbered key per depth ("The pass key
number 3 is 12345. ..."), read with `Engine.feed` by an inf-llm engine whose block store keeps at most
`host_cache_bytes` of blocks in RAM and the rest on disk. Then each key is asked for in turn, from a snapshot of
the memory taken after the document (the question is rolled back before the next one), and answered greedily.

The same is done first at a short length (4K by default) with the same settings: its accuracy is the control
(what the model manages with this multi-key task when nothing is far away) and its decode time the baseline of
the ratio. While reading, a record every `--every` tokens keeps the trajectory of process memory (RSS), RAM held
by blocks, representatives and disk bytes, so a stopped run still shows whether the budget held.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil

from inf_llm.bench.prompt import FILLER, INTRO
from inf_llm.bench.results import ResultLog, machine_info
from inf_llm.config.schema import InfLLMConfig
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams

KIND, PROGRESS_KIND = "long_read", "long_read_progress"
_PLACEHOLDER = "\u0000DOCUMENT\u0000"


@dataclass(frozen=True)
class Document:
    ids: list[int]  # the user message up to the end of the filler (no question)
    keys: list[str]  # key i+1 is at depths[i]
    needle_tokens: list[int]  # token index where each key's line starts
    depths: tuple[float, ...]


# Keys are told apart by a word rather than a number: a small model copies "the pass key of the tiger is" from
# its memory far more reliably than "pass key number 3 is" (digits differ in one token).
LABELS = ("tiger", "violin", "castle", "river", "apple", "rocket", "garden", "pencil", "island", "candle")


def label_of(index: int) -> str:
    if not 0 <= index < len(LABELS):
        raise ValueError(f"at most {len(LABELS)} keys per document")
    return LABELS[index]


def needle_line(label: str, key: str) -> str:
    return f"The pass key of the {label} is {key}. Remember it. {key} is the pass key of the {label}."


def question_text(label: str) -> str:
    return f"What is the pass key of the {label}?"


def answer_prefix(label: str) -> str:
    return f"The pass key of the {label} is"


def _template_parts(tokenizer) -> tuple[str, str]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], tokenize=False,
                                         add_generation_prompt=True)
    head, _, tail = text.partition(_PLACEHOLDER)
    return head, tail


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _filler(start: int, count: int) -> str:
    return " ".join(FILLER[i % len(FILLER)] for i in range(start, start + count))


def build_document(tokenizer, length: int, depths: tuple[float, ...], seed: int = 0) -> Document:
    """About `length` tokens (within a few sentences): template head, intro, filler with one key per depth.

    Pieces are tokenized separately and joined at line breaks, so that a million-token text never goes
    through the tokenizer at once; the needle token positions are therefore exact.
    """
    head, _ = _template_parts(tokenizer)
    rng = random.Random(f"long-read:{seed}:{length}")
    keys = [str(rng.randint(10000, 99999)) for _ in depths]
    start = _encode(tokenizer, f"{head}{INTRO}\n\n")
    needles = [_encode(tokenizer, f"\n{needle_line(label_of(i), key)}\n") for i, key in enumerate(keys)]
    probe = 100 * len(FILLER)
    per_sentence = len(_encode(tokenizer, _filler(0, probe))) / probe
    budget = length - len(start) - sum(len(n) for n in needles)
    if budget <= 0:
        raise ValueError(f"length={length} is too short for {len(depths)} keys")
    total = round(budget / per_sentence)
    ids, needle_tokens, done = list(start), [], 0
    for depth, needle in zip(sorted(depths), needles):
        upto = round(depth * total)
        ids += _encode(tokenizer, _filler(done, upto - done)) if upto > done else []
        needle_tokens.append(len(ids))
        ids += needle
        done = upto
    ids += _encode(tokenizer, _filler(done, total - done)) if total > done else []
    return Document(ids, keys, needle_tokens, tuple(sorted(depths)))


def question_ids(tokenizer, label: str) -> list[int]:
    _, tail = _template_parts(tokenizer)
    return _encode(tokenizer, f"\n\n{question_text(label)}{tail}{answer_prefix(label)}")


def _rss() -> int:
    return psutil.Process().memory_info().rss


def tier_bytes(engine: Engine) -> dict[str, int]:
    """RAM held by block records and by representatives, and bytes on disk, summed over the layers."""
    layers = engine.memory.layers
    return {
        "host_block_bytes": sum(layer.blocks.host_bytes() for layer in layers),
        "repr_bytes": sum(layer.reprs.numel() * layer.reprs.element_size() for layer in layers),
        "disk_bytes": sum(layer.blocks.disk_bytes() for layer in layers),
        "disk_blocks": sum(layer.blocks.disk_blocks() for layer in layers),
        "host_blocks": sum(layer.blocks.host_blocks() for layer in layers),
    }


def ask_all(engine: Engine, doc: Document, max_new_tokens: int) -> list[dict[str, Any]]:
    """Ask for every key from the memory after the document; the memory is left as it was."""
    snap = engine.snapshot()
    answers = []
    try:
        for index, key in enumerate(doc.keys):
            label = label_of(index)
            q = question_ids(engine.tokenizer, label)
            engine.feed(q[:-1])
            text, ms = "", None
            for step in engine.generate(q[-1:], SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)):
                text += step.text
                ms = step.decode_ms_per_token
            # Which key was given, when not the right one: another key of the document still shows that
            # retrieval reached it, and the model mixed up the labels.
            given = [label_of(i) for i, other in enumerate(doc.keys) if other in text]
            answers.append({"label": label, "depth": doc.depths[index], "key": key, "answer": text,
                            "correct": key in text, "keys_given": given, "decode_ms_per_token": ms})
            engine.restore(snap)
    finally:
        engine.restore(snap)
    return answers


def read_and_ask(model, tokenizer, config: InfLLMConfig, length: int, depths: tuple[float, ...], *,
                 prefill_chunk: int, max_new_tokens: int, every: int,
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 on_tokens: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """One measured read of a `length`-token document, then every key asked for; the result's fields."""
    doc = build_document(tokenizer, length, depths)
    engine = Engine(model, tokenizer, config, prefill_chunk=prefill_chunk)
    gc.collect()
    rss_start = rss_peak = _rss()
    start = time.perf_counter()
    next_mark = every

    def progress(done: int, total: int) -> None:
        nonlocal rss_peak, next_mark
        rss = _rss()
        rss_peak = max(rss_peak, rss)
        if on_tokens is not None:
            on_tokens(done, total)
        if on_progress is not None and done >= next_mark:
            next_mark += every
            on_progress({"tokens": done, "seconds": time.perf_counter() - start, "rss_bytes": rss,
                         **tier_bytes(engine)})

    engine.feed(doc.ids, progress=progress)
    prefill_s = time.perf_counter() - start
    rss_peak = max(rss_peak, _rss())
    tiers = tier_bytes(engine)
    answers = ask_all(engine, doc, max_new_tokens)
    rss_peak = max(rss_peak, _rss())
    decode = [a["decode_ms_per_token"] for a in answers if a["decode_ms_per_token"] is not None]
    result = {
        "tokens": len(doc.ids),
        "needle_tokens": doc.needle_tokens,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": len(doc.ids) / prefill_s,
        "decode_ms_per_token": sum(decode) / len(decode) if decode else None,
        "answers": answers,
        "correct": sum(a["correct"] for a in answers),
        "asked": len(answers),
        "rss_start_bytes": rss_start,
        "rss_peak_bytes": rss_peak,
        "rss_end_bytes": _rss(),
        **tiers,
    }
    del engine
    gc.collect()
    return result


def run_long_read(model, tokenizer, model_id: str, config: InfLLMConfig, lengths: tuple[int, ...],
                  depths: tuple[float, ...], log: ResultLog, *, prefill_chunk: int = 2048, max_new_tokens: int = 8,
                  every: int = 65536, say: Callable[[str], None] = print,
                  on_tokens: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Each length in turn (shortest first: the control), one record each; progress records while reading."""
    machine = machine_info()
    records = []
    for length in sorted(lengths):
        case = {"model": model_id, "settings": config.to_dict(), "length": length, "depths": list(depths)}

        def note(fields: dict[str, Any], case=case) -> None:
            log.append(PROGRESS_KIND, case, **fields)
            say(f"{fields['tokens']:>9,} tokens  {fields['seconds']:7.0f} s  RSS {fields['rss_bytes'] / 2**30:5.2f} GiB"
                f"  blocks in RAM {fields['host_block_bytes'] / 2**30:5.2f} GiB"
                f"  representatives {fields['repr_bytes'] / 2**30:5.2f} GiB  disk {fields['disk_bytes'] / 2**30:6.2f} GiB")

        result = read_and_ask(model, tokenizer, config, length, depths, prefill_chunk=prefill_chunk,
                              max_new_tokens=max_new_tokens, every=every, on_progress=note, on_tokens=on_tokens)
        records.append(log.append(KIND, case, machine=machine, **result))
        answers = ", ".join(f"{a['label']} ({a['depth']:.0%}) {'ok' if a['correct'] else 'missed'} {a['answer']!r}"
                            for a in result["answers"])
        say(f"{result['tokens']:,} tokens: {result['correct']}/{result['asked']} keys; "
            f"{result['prefill_tokens_per_s']:.0f} tokens/s; decode {result['decode_ms_per_token']:.1f} ms/token; "
            f"peak RSS {result['rss_peak_bytes'] / 2**30:.2f} GiB; {answers}")
    return records
