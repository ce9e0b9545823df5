"""Why a long-document case failed: the retrieval trace of one prose case (`python -m inf_llm.bench trace`).

It reads the case's prompt with a `RetrievalTrace` attached, answers it as the benchmark does, and reports, for the
prompt's last chunk and every decoded token: in how many layers the blocks holding the answer's needles were
chosen (whole, or only part of a needle cut by a block boundary), how the needle's best block ranked, and the
attention weight the query put on the needle's tokens. A summary classifies the case:

- `answered`: the reply holds every expected number;
- `in the window`: the needle was still in the local window (no retrieval needed);
- `never retrieved`: no layer chose a needle block at any decoded token;
- `split at a block boundary`: layers chose part of the needle much more often than all of it;
- `dropped while decoding`: most layers had the needle for the prompt's last chunk, fewer than half at decoding;
- `retrieved in too few layers`: fewer than half the layers chose it at the decoded tokens;
- `retrieved and not used`: most layers chose it and the answer is still wrong (a limit of the model, or of
  attending it at one distance: see the weight column).

Where the answer needs several needles (`twohop`, `multivalue`, `multiquery`), the class is that of the needle
retrieved in the fewest layers while decoding, named after it ("never retrieved (needle 2 of 2, tokens ...)"):
one needle read in every layer and the other in none is not a needle split at a block boundary.

`trace_dialogue` does the same for a case asked as a dialogue (the document pasted, then each question a message
of its own, `prose.converse`): each question's turn is traced, from its reading to the end of its reply, with the
needles where the pasted document put them in the conversation.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Any

from inf_llm.bench.prose import answer, converse
from inf_llm.bench.prose_tasks import ProsePrompt
from inf_llm.bench.table_data import TableData
from inf_llm.generation.engine import Engine
from inf_llm.memory.retrieval_trace import RetrievalTrace


@dataclass(frozen=True)
class StepSummary:
    label: str  # "prompt end" or the decoded token's text
    start: int  # position of the step's first query
    layers_whole: int  # layers that chose every block of the needles
    layers_part: int  # layers that chose at least one
    per_needle: tuple[tuple[int, int], ...]  # for each needle the answer needs: (layers whole, layers part)
    rank: float | None  # median over layers of the best needle block's rank (0 = first)
    weight: float  # attention on the needles' tokens, mean over layers (1 = all of it)
    ranks: tuple[int | None, ...]  # per layer


def needle_spans(prompt: ProsePrompt) -> list[tuple[int, int]]:
    return [prompt.needles[i] for i in prompt.answer_needles]


def summarise(trace: RetrievalTrace, prompt: ProsePrompt, reply_tokens: list[str]) -> list[StepSummary]:
    """One summary per traced step from the prompt's last chunk on."""
    spans = needle_spans(prompt)
    span_blocks = [trace.blocks_of(a, e) for a, e in spans]
    needle_blocks = sorted(set().union(*span_blocks))
    last_prompt = len(prompt.ids) - 1  # generate feeds this token; its query gives the first reply token
    starts = sorted({c.start for c in trace.chunks})
    prompt_end = max((s for s in starts if s < last_prompt), default=None)
    steps = ([("prompt end", prompt_end)] if prompt_end is not None else [])
    steps += [(text, last_prompt + i) for i, text in enumerate(reply_tokens) if last_prompt + i in starts]
    out = []
    for label, start in steps:
        chunks = sorted((c for c in trace.chunks if c.start == start), key=lambda c: c.layer)
        whole = part = 0
        each = [[0, 0] for _ in spans]
        ranks, weights = [], []
        for chunk in chunks:
            chosen = set(chunk.blocks.flatten().tolist())
            whole += bool(needle_blocks) and set(needle_blocks) <= chosen
            part += bool(chosen & set(needle_blocks))
            for counts, blocks in zip(each, span_blocks):
                counts[0] += bool(blocks) and set(blocks) <= chosen
                counts[1] += bool(chosen & set(blocks))
            ranks.append(min((r for b in needle_blocks if (r := chunk.rank_of(b)) is not None), default=None))
            weights.append(sum(trace.weight_on(chunk, a, e) for a, e in spans))
        known = [r for r in ranks if r is not None]
        out.append(StepSummary(label, start, whole, part, tuple(map(tuple, each)),
                               statistics.median(known) if known else None,
                               sum(weights) / max(len(weights), 1), tuple(ranks)))
    return out


def classify(steps: list[StepSummary], prompt: ProsePrompt, score: float, num_layers: int, window: int) -> str:
    if score == 1.0:
        return "answered"
    if all(a >= len(prompt.ids) - window for a, _ in needle_spans(prompt)):
        return "in the window"
    decoding = [s for s in steps if s.label != "prompt end"]
    if not decoding or all(s.layers_part == 0 for s in decoding):
        return "never retrieved"
    spans = needle_spans(prompt)
    # Of the needles that memory must bring back (not those still in the window), the one retrieved whole in the
    # fewest layers while decoding (ties: the first) decides the class.
    remote = [i for i, (a, _) in enumerate(spans) if a < len(prompt.ids) - window]
    wholes = {i: statistics.mean(s.per_needle[i][0] for s in decoding) / num_layers for i in remote}
    worst = min(remote, key=lambda i: wholes[i])
    whole = wholes[worst]
    part = statistics.mean(s.per_needle[worst][1] for s in decoding) / num_layers
    a, e = spans[worst]
    named = "" if len(spans) == 1 else f" (needle {worst + 1} of {len(spans)}, tokens {a}-{e})"
    prompt_end = next((s for s in steps if s.label == "prompt end"), None)
    if whole < 0.5 and part >= 0.5 and part - whole >= 0.25:
        return "split at a block boundary" + named
    if whole < 0.5 and prompt_end is not None and prompt_end.per_needle[worst][0] / num_layers >= 0.5:
        return "dropped while decoding" + named
    if part == 0:
        return "never retrieved" + named
    if whole < 0.5:
        return "retrieved in too few layers" + named
    return "retrieved and not used"


def trace_case(engine: Engine, prompt: ProsePrompt, min_new_tokens: int = 0) -> dict[str, Any]:
    """Answer the case with a trace attached (the reply's first `min_new_tokens` never end it, as the chat's
    `--min-new-tokens`); its record fields plus the per-step summaries and the class."""
    engine.reset()
    engine.expect(len(prompt.ids))  # the memory the prompt is read into (short_conversation), before it is traced
    trace = engine.memory.start_trace()
    try:
        result = answer(engine, prompt, min_new_tokens=min_new_tokens, fresh=False)
    finally:
        engine.memory.stop_trace()
    texts = [engine.tokenizer.decode([t]) for t in result["reply_ids"]]  # step i's query gives reply token i
    steps = summarise(trace, prompt, texts)
    layers = len(engine.memory.layers)
    result["steps"] = steps
    result["class"] = classify(steps, prompt, result["score"], layers,
                               engine.memory_config.window_for(len(prompt.ids) + 1))
    result["needle_blocks"] = [trace.blocks_of(a, e) for a, e in needle_spans(prompt)]
    result["layers"] = layers
    return result


def needles_in(prompt: ProsePrompt, tokens: list[int]) -> tuple[tuple[int, int], ...]:
    """The token spans of the prompt's needles in a conversation that holds its document (pasted as a message of its
    own): where the one-message prompt has them when the conversation renders the document alike, else where the
    needle's tokens first occur."""
    spans = []
    for a, e in prompt.needles:
        needle = prompt.ids[a:e]
        if tokens[a:e] == needle:
            spans.append((a, e))
            continue
        start = next((i for i in range(len(tokens) - len(needle) + 1) if tokens[i : i + len(needle)] == needle), None)
        if start is None:
            raise ValueError(f"the needle at tokens {a}-{e} of the prompt is not in the conversation's tokens")
        spans.append((start, start + len(needle)))
    return tuple(spans)


def trace_dialogue(engine: Engine, prompt: ProsePrompt, min_new_tokens: int = 0) -> dict[str, Any]:
    """Ask the case as a dialogue with a trace attached to each question's turn (the module's docstring): the
    record's fields, each turn under "turns" with its steps, class and needle blocks as `trace_case` gives them. A
    question that takes the conversation past short_conversation_until has the conversation read again before its
    trace starts: the trace follows the memory that answers."""
    from chat.conversation import common_prefix_len

    layers = len(engine.memory.layers)
    found: tuple[tuple[int, int], ...] | None = None  # the needles, located once the document is in memory

    def around(conversation, question: str):
        nonlocal found
        target = conversation.format.render([*conversation.messages, {"role": "user", "content": question}],
                                            add_generation_prompt=True)
        if found is None:
            found = needles_in(prompt, engine.tokens)
        # As generate will, before the question is read (it then finds the settings chosen and reads nothing again).
        engine.expect(len(target) - min(common_prefix_len(engine.tokens, target), len(target) - 1))
        trace = engine.memory.start_trace()

        def after(turn: dict[str, Any]) -> None:
            engine.memory.stop_trace()
            asked = replace(prompt, ids=target, question=question, answers=tuple(turn["answers"]), needles=found)
            texts = [engine.tokenizer.decode([t]) for t in turn["reply_ids"]]
            steps = summarise(trace, asked, texts)
            turn["steps"] = steps
            turn["class"] = classify(steps, asked, turn["score"], layers,
                                     engine.memory_config.window_for(len(target) + 1))
            turn["needle_blocks"] = [trace.blocks_of(a, e) for a, e in needle_spans(asked)]
            turn["layers"] = layers  # (a rebuilt memory has as many)
            turn["needles"] = [list(span) for span in found]
            turn["prompt_tokens"] = len(target)  # the conversation through the question's generation prompt

        return after

    result = converse(engine, prompt, min_new_tokens=min_new_tokens, around_question=around)
    result["layers"] = layers
    return result


def steps_table(result: dict[str, Any]) -> TableData:
    layers = result["layers"]
    rows = []
    for s in result["steps"]:
        ranks = " ".join("-" if r is None else str(r) for r in s.ranks)
        each = " ".join(f"{w}/{p}" for w, p in s.per_needle)
        rows.append((repr(s.label), str(s.start), f"{s.layers_whole}/{layers}", f"{s.layers_part}/{layers}", each,
                     "-" if s.rank is None else f"{s.rank:g}", f"{s.weight:.3f}", ranks))
    return TableData(f"retrieval of the needle blocks {result['needle_blocks']} ({result['class']})",
                     ("step", "position", "layers: whole", "layers: part", "each needle: whole/part",
                      "median rank", "weight on needles",
                      "rank per layer (0 = best)"), tuple(rows), left_columns=1)
