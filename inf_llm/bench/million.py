"""The long read: a document of natural prose of up to a million tokens, read under a RAM budget, then asked about.

The document is what a chat user pastes: one user message in the chat template holding the prose benchmark's
instruction and natural prose (`corpus.py`: its paragraphs read circularly from a start drawn from the seed; the
corpus holds about 140K tokens, so a million-token document reads it about seven times over) with a "special magic
number" needle sentence (`prose_tasks.py`) between paragraphs at each depth, each for its own word. It is read by
`Engine.feed` with an inf-llm engine whose block store keeps at most `host_cache_bytes` of blocks in RAM and the
rest on disk. Then each needle's question ends the user message ("What is the special magic number for WORD
mentioned in the provided text?"), and the reply is generated freely and greedily (no answer prefix) from a
snapshot of the memory after the document, and scored by exact match of the number, as the prose benchmark does.
With `one_needle=True` each depth gets a document of its own (a single-needle prompt: retrieval alone is measured,
at the cost of one read per depth); otherwise one document holds every needle (one read; the other needles are
then distractors).

The same is done first at a short length (4K by default) with the same settings: its accuracy is the control
and its decode time the baseline of the ratio. While reading, the memory is saved as a chat session (the session
store of the chat, `inf_llm.sessions`) every `every` tokens, with a record of process memory (RSS), RAM held by
blocks and representatives, disk bytes and the time of the save: a read that is stopped resumes from its last
save when the command is run again. After the questions the engine is dropped, the session is resumed into a new
engine (timed) and asked again: the answers must be the same.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil

from inf_llm.bench.corpus import load_paragraphs
from inf_llm.bench.prose_tasks import INTRO, MAX_NEW_TOKENS, WORDS, render, score
from inf_llm.bench.results import ResultLog, case_id, machine_info
from inf_llm.config.schema import InfLLMConfig
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from inf_llm.memory.retrieval_trace import RetrievalTrace
from inf_llm.sessions.identity import memory_settings

KIND, PROGRESS_KIND = "long_read", "long_read_progress"
# Bump when the document's layout, wording or corpus use changes (version 1 was the passkey filler).
DOCUMENT_VERSION = 2
_PLACEHOLDER = "\u0000DOCUMENT\u0000"
_BOOKKEEPING = "long-read bookkeeping "


@dataclass(frozen=True)
class Needle:
    word: str
    value: str
    depth: float
    start: int  # token index where its sentence (after the paragraph break) starts in the document's ids
    end: int


@dataclass(frozen=True)
class Document:
    ids: list[int]  # the user message up to the end of the prose (no question)
    needles: tuple[Needle, ...]  # sorted by depth

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(b"".join(i.to_bytes(4, "little") for i in self.ids))
        return digest.hexdigest()[:16]


def needle_sentence(word: str, value: str) -> str:
    return f"One of the special magic numbers for {word} is: {value}."


def question_text(word: str) -> str:
    return f"What is the special magic number for {word} mentioned in the provided text?"


def _template_parts(tokenizer) -> tuple[str, str]:
    """The chat rendering of one user message, split around its content: (head, tail)."""
    head, _, tail = render(tokenizer, _PLACEHOLDER).partition(_PLACEHOLDER)
    return head, tail


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_document(tokenizer, length: int, depths: tuple[float, ...], seed: int = 0,
                   paragraphs: tuple[str, ...] | None = None) -> Document:
    """`length` tokens: template head, instruction, then paragraphs with one needle per depth between them.

    Each paragraph is tokenized once, with the paragraph break before it, and the pieces are joined, so that a
    million-token text never goes through the tokenizer at once and needle positions are exact; the last
    paragraph is cut to make the length exact (a needle at depth 1.0 follows whole paragraphs, which can pass it).
    """
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths={depths!r}: give at least one, each in [0, 1] (a fraction of the document)")
    paragraphs = load_paragraphs() if paragraphs is None else paragraphs
    head, _ = _template_parts(tokenizer)
    rng = random.Random(f"long-read:{DOCUMENT_VERSION}:{seed}:{length}:{sorted(depths)}")
    words = rng.sample(WORDS, len(depths))
    values: list[str] = []
    while len(values) < len(depths):
        value = str(rng.randint(1_000_000, 9_999_999))
        if value not in values:
            values.append(value)
    start = _encode(tokenizer, f"{head}{INTRO}")
    pieces = [_encode(tokenizer, f"\n\n{needle_sentence(w, v)}") for w, v in zip(words, values)]
    budget = length - len(start) - sum(len(p) for p in pieces)
    if budget <= 0:
        raise ValueError(f"length={length} is too short for the instruction and {len(depths)} needles")
    encoded: dict[int, list[int]] = {}
    first = rng.randrange(len(paragraphs))

    def prose_pieces():
        """The paragraphs' tokens from the seed's start on, circularly, each tokenized once."""
        for index in itertools.count(first):
            k = index % len(paragraphs)
            if k not in encoded:
                encoded[k] = _encode(tokenizer, f"\n\n{paragraphs[k]}")
            yield encoded[k]

    ids, needles, prose, stream = list(start), [], 0, prose_pieces()
    # A needle goes in after the paragraph that reaches its depth; the last piece is cut at the budget.
    for i in sorted(range(len(depths)), key=lambda i: depths[i]):
        while prose < round(depths[i] * budget):
            piece = next(stream)
            ids += piece
            prose += len(piece)
        needles.append(Needle(words[i], values[i], depths[i], len(ids), len(ids) + len(pieces[i])))
        ids += pieces[i]
    while prose < budget:
        piece = next(stream)[: budget - prose]
        ids += piece
        prose += len(piece)
    return Document(ids, tuple(needles))


def question_ids(tokenizer, word: str) -> list[int]:
    """The end of the user message (the question) and the assistant's turn, with no start of the answer."""
    _, tail = _template_parts(tokenizer)
    return _encode(tokenizer, f"\n\n{question_text(word)}{tail}")


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
    """Ask for every needle's number from the memory after the document; the memory is left as it was."""
    snap = engine.snapshot()
    answers = []
    try:
        for needle in doc.needles:
            text, ms = "", None
            params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
            for step in engine.generate(question_ids(engine.tokenizer, needle.word), params):
                text += step.text
                ms = step.decode_ms_per_token
            # Another needle's number in the reply still shows that retrieval reached that needle.
            given = [other.word for other in doc.needles if other is not needle and score((other.value,), text)]
            answers.append({"word": needle.word, "depth": needle.depth, "value": needle.value, "reply": text,
                            "correct": score((needle.value,), text) == 1.0, "values_given": given,
                            "decode_ms_per_token": ms})
            engine.restore(snap)
    finally:
        engine.restore(snap)
    return answers


def _bookkeeping(session) -> dict[str, Any]:
    for message in session.messages:
        if message["content"].startswith(_BOOKKEEPING):
            return json.loads(message["content"][len(_BOOKKEEPING):])
    raise ValueError(f"{session.path} is not a long-read checkpoint (no bookkeeping message)")


def needle_blocks(doc: Document, config: InfLLMConfig) -> list[int]:
    """The memory blocks that hold any token of the document's needles (blocks are cut from the tokens after the
    sinks, `block_size` at a time): what `needle_oracle` forces."""
    layout = RetrievalTrace(config.block_size, config.num_sink_tokens)
    return layout.blocks_of_spans((n.start, n.end) for n in doc.needles)


def read_and_ask(model, tokenizer, config: InfLLMConfig, doc: Document, session_dir: Path, *, prefill_chunk: int,
                 max_new_tokens: int, every: int, on_progress: Callable[[dict[str, Any]], None] | None = None,
                 on_tokens: Callable[[int, int], None] | None = None, keep_session: bool = False,
                 needle_oracle: bool = False) -> dict[str, Any]:
    """One measured read of `doc` (resumed from the checkpoint in `session_dir` if there is one), every needle
    asked for, then the session resumed into a new engine and asked again; the result's fields. With
    `needle_oracle` the blocks of every needle are forced into every layer's choice from the first token on, in
    both engines: an analysis (can the model answer from this far with its needle retrieved throughout?)."""
    from inf_llm.sessions.state_file import STATE_FILE
    from inf_llm.sessions.store import release, resume_session, save_session

    chat = {"long_read": doc.fingerprint}
    engine = Engine(model, tokenizer, config, prefill_chunk=prefill_chunk)
    gc.collect()
    rss_start = rss_peak = _rss()
    done, prefill_s, saves, resumed_from = 0, 0.0, [], None
    if (session_dir / STATE_FILE).exists():
        start = time.perf_counter()
        session = resume_session(session_dir, engine, chat)
        done = len(engine.tokens)
        if engine.tokens != doc.ids[:done]:
            raise ValueError(f"{session_dir} holds {done} tokens that are not this document's first ones")
        prefill_s = _bookkeeping(session)["prefill_s"]
        resumed_from = {"tokens": done, "resume_s": time.perf_counter() - start}
    engine.expect(len(doc.ids) - done)  # the memory the document is read into (short_conversation)
    if needle_oracle:  # not part of a saved session: set on each engine
        engine.memory.force_blocks(needle_blocks(doc, config))
    reading = time.perf_counter()

    def progress(chunk_done: int, chunk_total: int) -> None:
        nonlocal rss_peak
        rss_peak = max(rss_peak, _rss())
        if on_tokens is not None:
            on_tokens(done + chunk_done, len(doc.ids))

    while done < len(doc.ids):
        upto = min(len(doc.ids), (done // every + 1) * every)
        start = time.perf_counter()
        engine.feed(doc.ids[done:upto], progress=progress)
        prefill_s += time.perf_counter() - start
        done = upto
        start = time.perf_counter()
        save_session(session_dir, engine, [{"role": "user", "content": _BOOKKEEPING + json.dumps(
            {"prefill_s": prefill_s})}], chat)
        saves.append(time.perf_counter() - start)
        rss_peak = max(rss_peak, _rss())
        if on_progress is not None:
            on_progress({"tokens": done, "seconds": prefill_s, "save_s": saves[-1], "rss_bytes": _rss(),
                         "wall_s": time.perf_counter() - reading, **tier_bytes(engine)})
    tiers = tier_bytes(engine)
    answers = ask_all(engine, doc, max_new_tokens)
    rss_peak = max(rss_peak, _rss())
    release(engine)  # the session's files stay as saved
    del engine
    gc.collect()

    # The saved session, resumed as the chat resumes one, must give the same answers.
    engine = Engine(model, tokenizer, config, prefill_chunk=prefill_chunk)
    start = time.perf_counter()
    resume_session(session_dir, engine, chat)
    resume_s = time.perf_counter() - start
    if needle_oracle:
        engine.memory.force_blocks(needle_blocks(doc, config))
    again = ask_all(engine, doc, max_new_tokens)
    rss_peak = max(rss_peak, _rss())
    release(engine)
    del engine
    gc.collect()
    session_bytes = sum(f.stat().st_size for f in session_dir.rglob("*") if f.is_file())
    if not keep_session:
        shutil.rmtree(session_dir, ignore_errors=True)
    decode = [a["decode_ms_per_token"] for a in answers if a["decode_ms_per_token"] is not None]
    return {
        "tokens": len(doc.ids),
        "needles": [[n.start, n.end] for n in doc.needles],
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": len(doc.ids) / prefill_s if prefill_s else None,
        "decode_ms_per_token": sum(decode) / len(decode) if decode else None,
        "answers": answers,
        "correct": sum(a["correct"] for a in answers),
        "asked": len(answers),
        "resumed_from": resumed_from,
        "save_s": saves,  # one per checkpoint of this process; the first one writes every block so far
        "last_save_s": saves[-1] if saves else None,
        "session_bytes": session_bytes,
        "resume_s": resume_s,
        "resumed_replies": [a["reply"] for a in again],
        "same_after_resume": [a["reply"] for a in again] == [a["reply"] for a in answers],
        "resumed_decode_ms_per_token": sum(a["decode_ms_per_token"] or 0 for a in again) / max(len(again), 1),
        "rss_start_bytes": rss_start,
        "rss_peak_bytes": rss_peak,
        "rss_end_bytes": _rss(),
        **tiers,
    }


def run_long_read(model, tokenizer, model_id: str, config: InfLLMConfig, lengths: tuple[int, ...],
                  depths: tuple[float, ...], log: ResultLog, *, one_needle: bool = False, seed: int = 0,
                  prefill_chunk: int = 2048, max_new_tokens: int = MAX_NEW_TOKENS["single"], every: int = 65536,
                  keep_sessions: bool = False, say: Callable[[str], None] = print,
                  on_tokens: Callable[[int, int], None] | None = None,
                  needle_oracle: bool = False) -> list[dict[str, Any]]:
    """Each length in turn (shortest first: the control), each document of it (one per depth with one_needle),
    one record each; a case already in `log` is skipped, and a stopped read resumes from its checkpoint (kept in
    a folder beside the log). A whole read kept (`keep_sessions`) is resumed and asked again by a run under other
    settings that the saved memory does not depend on (`memory_settings`)."""
    machine = machine_info()
    records = []
    documents = [(d,) for d in depths] if one_needle else [tuple(depths)]
    for length in sorted(lengths):
        for doc_depths in documents:
            case = {"model": model_id, "settings": config.to_dict(), "length": length, "depths": list(doc_depths),
                    "seed": seed, "version": DOCUMENT_VERSION, "max_new_tokens": max_new_tokens}
            if needle_oracle:  # its own records and checkpoints: the forced needles change what is read
                case["needle_oracle"] = True
            if log.done(KIND, case):
                continue
            doc = build_document(tokenizer, length, doc_depths, seed)
            # The checkpoint is named by what its memory depends on: a run under other second-stage or speed settings
            # (the RAM budget too) resumes a kept read and only asks its questions.
            name = hashlib.sha256(case_id({**case, "settings": memory_settings(case["settings"])}).encode()
                                  ).hexdigest()[:16]
            session_dir = log.path.with_name(f"{log.path.stem}-sessions") / name
            session_dir.parent.mkdir(parents=True, exist_ok=True)

            def note(fields: dict[str, Any], case=case) -> None:
                log.append(PROGRESS_KIND, case, **fields)
                say(f"{fields['tokens']:>9,} tokens  {fields['seconds']:7.0f} s  save {fields['save_s']:5.1f} s"
                    f"  RSS {fields['rss_bytes'] / 2**30:5.2f} GiB"
                    f"  blocks in RAM {fields['host_block_bytes'] / 2**30:5.2f} GiB"
                    f"  representatives {fields['repr_bytes'] / 2**30:5.2f} GiB"
                    f"  disk {fields['disk_bytes'] / 2**30:6.2f} GiB")

            result = read_and_ask(model, tokenizer, config, doc, session_dir, prefill_chunk=prefill_chunk,
                                  max_new_tokens=max_new_tokens, every=every, on_progress=note, on_tokens=on_tokens,
                                  keep_session=keep_sessions, needle_oracle=needle_oracle)
            records.append(log.append(KIND, case, machine=machine, **result))
            answers = ", ".join(f"{a['word']} ({a['depth']:.0%}) {'ok' if a['correct'] else 'missed'} {a['reply']!r}"
                                for a in result["answers"])
            say(f"{result['tokens']:,} tokens: {result['correct']}/{result['asked']} found; "
                f"{result['prefill_tokens_per_s']:.0f} tokens/s; decode {result['decode_ms_per_token']:.1f} ms/token; "
                f"resume {result['resume_s']:.1f} s ({'same' if result['same_after_resume'] else 'DIFFERENT'} "
                f"answers); peak RSS {result['rss_peak_bytes'] / 2**30:.2f} GiB; {answers}")
    return records
