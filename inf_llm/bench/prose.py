"""The long-document benchmark: needle tasks over natural prose (`prose_tasks.py`), along the chat user's path.

Each case reads one prompt into an empty memory (`Engine.feed`, chunked prefill) and answers it freely and
greedily (`Engine.generate`, no answer prefix, the task's token budget), as `python -m inf_llm.chat --temperature 0`
would answer a pasted document with a question. Its score is the fraction of the expected numbers in the reply.
Cases run shortest first, and within a length task by task, so that a stopped run has comparable cells; the
result log makes a run resumable (rerun the same command).

With `dialogue` a case is asked as a chat user who pastes the document first: through the chat's own
`Conversation` and chat format, the document is one message and the model replies to it freely (greedy, at most
`PASTE_REPLY_TOKENS`), then each question is a message of its own (`prose_tasks.dialogue_of`), answered as above;
the case's score is the mean of its questions' scores.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from inf_llm.bench.methods import MethodRun
from inf_llm.bench.prose_tasks import (MAX_NEW_TOKENS, PROMPT_VERSION, ProsePrompt, build_prose_prompt, dialogue_of,
                                       score)
from inf_llm.bench.results import ResultLog, machine_info
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from inf_llm.memory.retrieval_trace import RetrievalTrace

logger = logging.getLogger(__name__)

KIND = "prose"
# A dialogue's reply to the pasted document: what the chat would print (an acknowledgement, a summary begun), cut
# here to bound the case's time; the questions' replies have the task's budget.
PASTE_REPLY_TOKENS = 64


@dataclass(frozen=True)
class ProsePlan:
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    seeds: int  # seeds 0 .. seeds-1 per task, length and depth
    full_max_len: int  # full attention runs only up to this length
    stream_max_len: int | None = None  # StreamingLLM too, when given (it finds nothing beyond its window)
    prefill_chunk: int = 2048
    first_seed: int = 0
    # The chat's penalty on what a reply repeats beyond its context (`RepeatCounter`); 1.0 = none, as greedy
    # benchmark answers are (a case run with a penalty is its own case, and its label says so).
    repetition_penalty: float = 1.0
    # The chat's `min_new_tokens`: the reply's first N tokens are never the end of the turn (0: the model's choice).
    min_new_tokens: int = 0
    # An oracle for analysis: inf-llm runs add the blocks of the needles that hold the answer to every layer's
    # choice (`InfLLMMemory.force_blocks`) at every step ("all": what is then still wrong is not the ranking's
    # doing), from the chunk that reaches the question on ("question": is the document read well enough, and
    # the question's reading and the reply where retrieval must find it?), from the chunk that reaches the last N
    # tokens of the document on ("last:N": how much of the prose before the question must have read them?) or only
    # while the reply is decoded ("reply"); None: off.
    needle_oracle: str | None = None
    # The document pasted as a message of its own, then the questions one message each (`converse`).
    dialogue: bool = False

    def __post_init__(self):
        if self.dialogue and self.needle_oracle is not None:
            raise ValueError("--needle-oracle forces the needles of a one-message prompt; it does not apply to "
                             "--dialogue")


# --needle-oracle's modes: their names in a case's key (kept apart from plain cases) and in its label.
ORACLE_KEYS = {"all": "needles", "question": "needles from the question", "reply": "needles while replying"}
ORACLE_LABELS = {"all": "needle oracle", "question": "needle oracle (question)", "reply": "needle oracle (reply)"}


def oracle_tail(mode: str) -> int | None:
    """N of a "last:N" oracle mode (the needles forced from N tokens before the document's end on), else None."""
    return int(mode.split(":", 1)[1]) if mode.startswith("last:") else None


def oracle_start(mode: str | None, prompt: ProsePrompt) -> int | None:
    """The position from which a mode forces the needles while the prompt is read (None: not while reading)."""
    if mode is None or mode == "reply":
        return None
    if mode == "all":
        return 0
    return max(0, prompt.context[1] - (oracle_tail(mode) or 0))  # "question" is the document's end itself


def oracle_key(mode: str) -> str:
    tail = oracle_tail(mode)
    return ORACLE_KEYS[mode] if tail is None else f"needles from {tail} tokens before the question"


def oracle_label(mode: str) -> str:
    tail = oracle_tail(mode)
    return ORACLE_LABELS[mode] if tail is None else f"needle oracle (last {tail})"


@dataclass(frozen=True)
class ProseCase:
    run: MethodRun
    task: str
    length: int
    depth: float
    seed: int
    repetition_penalty: float = 1.0
    needle_oracle: str | None = None
    min_new_tokens: int = 0
    dialogue: bool = False

    def key(self, model_id: str) -> dict[str, Any]:
        prompt = {"version": PROMPT_VERSION, "max_new_tokens": MAX_NEW_TOKENS[self.task]}
        if self.repetition_penalty != 1.0:
            prompt["repetition_penalty"] = self.repetition_penalty
        if self.min_new_tokens:
            prompt["min_new_tokens"] = self.min_new_tokens
        if self.dialogue:
            prompt["dialogue"] = {"paste_reply_tokens": PASTE_REPLY_TOKENS}
        key = {"model": model_id, "settings": self.run.identity(), "task": self.task, "length": self.length,
               "depth": self.depth, "seed": self.seed, "prompt": prompt}
        if self.needle_oracle is None:
            return key
        return {**key, "oracle": oracle_key(self.needle_oracle)}

    @property
    def label(self) -> str:
        return (self.run.label + (f" penalty {self.repetition_penalty:g}" if self.repetition_penalty != 1.0 else "")
                + (f" min {self.min_new_tokens}" if self.min_new_tokens else "")
                + (" dialogue" if self.dialogue else "")
                + ("" if self.needle_oracle is None else " " + oracle_label(self.needle_oracle)))


def plan_cases(runs: list[MethodRun], plan: ProsePlan) -> list[ProseCase]:
    cases = []
    for length in sorted(plan.lengths):
        for task in plan.tasks:
            for run in runs:
                if run.method == "full" and length > plan.full_max_len:
                    continue
                if run.method == "stream-llm" and plan.stream_max_len is not None and length > plan.stream_max_len:
                    continue
                for depth in plan.depths:
                    for seed in range(plan.first_seed, plan.first_seed + plan.seeds):
                        cases.append(ProseCase(run, task, length, depth, seed, plan.repetition_penalty,
                                               plan.needle_oracle if run.method == "inf-llm" else None,
                                               plan.min_new_tokens, plan.dialogue))
    return cases


def answer(engine: Engine, prompt: ProsePrompt, progress=None, repetition_penalty: float = 1.0,
           before_reply: Callable[[], None] | None = None, min_new_tokens: int = 0, fresh: bool = True
           ) -> dict[str, Any]:
    """Read the prompt into an empty memory and answer it greedily; the measured fields of a record.
    `before_reply` runs between the prompt and the reply (whose first step feeds the prompt's last token).
    fresh=False: the engine is already empty (and holds what the caller attached to its memory)."""
    if fresh:
        engine.reset()
    elif engine.tokens:
        raise ValueError("answer(fresh=False) needs an empty engine")
    start = time.perf_counter()
    engine.feed(prompt.ids[:-1], progress=progress)  # generate feeds the last prompt token itself
    prefill_s = time.perf_counter() - start
    if before_reply is not None:
        before_reply()
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS[prompt.task],
                            repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens)
    reply, reply_ids, decode_ms = "", [], None
    for step in engine.generate(prompt.ids[-1:], params):
        reply += step.text
        reply_ids.append(step.token_id)
        decode_ms = step.decode_ms_per_token
    value = score(prompt.answers, reply)
    return {"tokens": len(prompt.ids), "answers": list(prompt.answers), "reply": reply, "reply_tokens": len(reply_ids),
            "reply_ids": reply_ids,
            "score": value, "correct": value == 1.0, "needles": [list(span) for span in prompt.needles],
            "prefill_s": prefill_s, "prefill_tokens_per_s": (len(prompt.ids) - 1) / prefill_s if prefill_s else None,
            "decode_ms_per_token": decode_ms}


def converse(engine: Engine, prompt: ProsePrompt, progress=None, repetition_penalty: float = 1.0,
             min_new_tokens: int = 0, around_question: Callable[[Any, str], Callable[[dict], None]] | None = None
             ) -> dict[str, Any]:
    """Ask a case as a dialogue (the module's docstring) in an empty memory; the measured fields of a record, with
    each question's turn under "turns" and the replies joined under "reply". around_question(conversation,
    question), when given, is called before each question is asked and returns what is called with its turn after
    (the dialogue's trace)."""
    from chat.chat_format import ChatFormat
    from chat.conversation import Conversation

    engine.reset()
    dialogue = dialogue_of(prompt)
    params = SamplingParams(temperature=0.0, max_new_tokens=PASTE_REPLY_TOKENS, repetition_penalty=repetition_penalty,
                            min_new_tokens=min_new_tokens)
    conversation = Conversation(engine, ChatFormat.create(engine.tokenizer), params)
    pasted = conversation.ask(dialogue.paste, progress=progress)
    conversation.params = replace(conversation.params, max_new_tokens=MAX_NEW_TOKENS[prompt.task])
    turns = []
    for question, answers in dialogue.questions:
        ids: list[int] = []
        after = None if around_question is None else around_question(conversation, question)
        reply = conversation.ask(question, on_step=lambda step, ids=ids: ids.append(step.token_id))
        turns.append({"question": question, "answers": list(answers), "reply": reply.text, "reply_ids": ids,
                      "score": score(answers, reply.text), "decode_ms_per_token": reply.decode_ms_per_token})
        if after is not None:
            after(turns[-1])
    value = sum(turn["score"] for turn in turns) / len(turns)
    return {"tokens": len(prompt.ids), "answers": list(prompt.answers), "reply": "\n".join(t["reply"] for t in turns),
            "reply_tokens": sum(len(t["reply_ids"]) for t in turns), "turns": turns, "score": value,
            "correct": value == 1.0, "paste_reply": pasted.text, "paste_reply_tokens": pasted.generated_tokens,
            "memory_tokens": len(engine.tokens), "prefill_tokens_per_s": pasted.prefill_tokens_per_s,
            "decode_ms_per_token": turns[-1]["decode_ms_per_token"]}


def answer_blocks(prompt: ProsePrompt, block_size: int, num_sink_tokens: int) -> list[int]:
    """The memory blocks that hold the needles with the prompt's answer (blocks are cut from the tokens after the
    sinks, `block_size` at a time): what the needle oracle forces and the trace follows."""
    return RetrievalTrace(block_size, num_sink_tokens).blocks_of_spans(prompt.needles[i] for i in prompt.answer_needles)


def run_prose(model, tokenizer, model_id: str, runs: list[MethodRun], plan: ProsePlan, log: ResultLog,
              console=None) -> list[dict[str, Any]]:
    """Run every case not yet in `log`, appending each record as it finishes; return the new records."""
    from rich.markup import escape

    from inf_llm.bench.display import make_progress

    cases = plan_cases(runs, plan)
    pending = [case for case in cases if not log.done(KIND, case.key(model_id))]
    if len(pending) < len(cases):
        logger.info("%d of %d prose cases are already in %s", len(cases) - len(pending), len(cases), log.path)
    machine, new = machine_info(), []
    engines: dict[MethodRun, Engine] = {}
    with make_progress(console) as progress:
        overall = progress.add_task("prose cases", total=len(pending))
        reading = progress.add_task("reading", total=1, visible=False)
        for case in pending:
            run = case.run
            if run not in engines:
                engines.clear()  # one engine at a time: the previous one's memory is freed first
                engines[run] = Engine(model, tokenizer, run.config, prefill_chunk=plan.prefill_chunk)
            prompt = build_prose_prompt(tokenizer, case.task, case.length, case.depth, case.seed)
            what = f"{case.label} {case.task} {case.length} tokens, depth {case.depth:.0%}, seed {case.seed}"
            progress.update(reading, description=what, completed=0, total=len(prompt.ids), visible=True)
            memory = engines[run].memory

            def force(prompt=prompt, memory=memory, config=run.config, from_position=0) -> None:
                memory.force_blocks(answer_blocks(prompt, config.block_size, config.num_sink_tokens), from_position)
            start = oracle_start(case.needle_oracle, prompt)
            if start is not None:
                force(from_position=start)
            read = lambda done, total: progress.update(reading, completed=done)  # noqa: E731
            try:
                if case.dialogue:
                    result = converse(engines[run], prompt, read, case.repetition_penalty, case.min_new_tokens)
                else:
                    result = answer(engines[run], prompt, read, case.repetition_penalty,
                                    before_reply=force if case.needle_oracle == "reply" else None,
                                    min_new_tokens=case.min_new_tokens)
            finally:
                if case.needle_oracle is not None:
                    memory.force_blocks(None)
            record = log.append(KIND, case.key(model_id), label=case.label, config=run.config.to_dict(),
                                machine=machine, **result)
            new.append(record)
            colour = "green" if result["correct"] else "red" if result["score"] == 0 else "yellow"
            progress.console.print(f"{escape(what)}: [{colour}]{result['score']:.2f}[/{colour}] expected "
                                   f"{' '.join(prompt.answers)}, reply {escape(repr(result['reply'][:120]))}")
            progress.advance(overall)
        progress.update(reading, visible=False)
    return new
