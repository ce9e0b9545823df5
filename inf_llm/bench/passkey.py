"""The passkey benchmark: retrieval accuracy over lengths x depths x seeds for each method.

Each case reads one passkey prompt (`prompt.py`) with `Engine.feed` (chunked prefill, a progress bar), then
answers greedily for a few tokens; it is correct when the key's digits appear in the answer. One model serves
every method: each method and length gets an `Engine` on it (attaching switches the model's attention to that
method), dropped afterwards, so a long case's memory is freed before the next.

Shared prefixes. The prompts of one length differ only from their needle on: the instruction and the filler
before it are the same text. So a case does not read that part again: it restores a snapshot of the memory taken
by an earlier case at a prefill-chunk boundary before its needle (`Checkpoints`), then reads the rest. The model
calls after the snapshot are exactly those a read from an empty memory makes (same chunks at the same offsets,
from the same state), so the result is that of a fresh read: `tests/test_bench.py` checks it. For depths
10/50/90% this reads 8.4 prompt lengths per 15 cases instead of 15.

Cases run shortest first (all methods at 4K, then all at 8K, ...), so that a stopped run has comparable results.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from inf_llm.bench.methods import MethodRun
from inf_llm.bench.prompt import ANSWER_PREFIX, PROMPT_VERSION, build_passkey_prompt, is_correct
from inf_llm.bench.results import ResultLog, machine_info
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams

logger = logging.getLogger(__name__)

KIND = "passkey"


@dataclass(frozen=True)
class PasskeyPlan:
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    seeds: int  # seeds 0 .. seeds-1 (one key each per length and depth)
    full_max_len: int  # full attention runs only up to this length
    max_new_tokens: int = 8
    answer_prefix: str = ANSWER_PREFIX
    chat_template: bool = True
    prefill_chunk: int = 2048


@dataclass(frozen=True)
class PasskeyCase:
    run: MethodRun
    length: int
    depth: float
    seed: int

    def key(self, model_id: str, plan: PasskeyPlan) -> dict[str, Any]:
        """Everything that determines this case's result (its identity in the result log)."""
        return {
            "model": model_id,
            "settings": self.run.identity(),
            "length": self.length,
            "depth": self.depth,
            "seed": self.seed,
            "prompt": {"version": PROMPT_VERSION, "chat_template": plan.chat_template,
                       "answer_prefix": plan.answer_prefix, "max_new_tokens": plan.max_new_tokens},
        }


def plan_cases(runs: list[MethodRun], plan: PasskeyPlan) -> list[PasskeyCase]:
    cases = []
    for length in sorted(plan.lengths):
        for run in runs:
            if run.method == "full" and length > plan.full_max_len:
                continue
            for depth in plan.depths:
                for seed in range(plan.seeds):
                    cases.append(PasskeyCase(run, length, depth, seed))
    return cases


class Checkpoints:
    """Snapshots of one engine's memory after token prefixes at multiples of its prefill chunk.

    Snapshots only roll back: restoring one makes the later ones unusable, so they are dropped.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.saved: list[tuple[list[int], Any]] = []  # (prefix ids, snapshot), shortest first

    def resume(self, ids: list[int]) -> int:
        """Bring the engine to the longest saved prefix of `ids` (empty memory if none); return its length."""
        for index in range(len(self.saved) - 1, -1, -1):
            prefix, snap = self.saved[index]
            if ids[: len(prefix)] == prefix:
                self.engine.restore(snap)
                del self.saved[index + 1 :]
                return len(prefix)
        self.engine.reset()
        self.saved.clear()
        return 0

    def save(self, ids: list[int]) -> None:
        self.saved.append((list(ids), self.engine.snapshot()))


def run_case(engine: Engine, case: PasskeyCase, plan: PasskeyPlan, progress=None,
             checkpoints: Checkpoints | None = None) -> dict[str, Any]:
    """Read the case's prompt and answer it; the measured fields of its record.

    With `checkpoints`, the part before the needle's prefill chunk is restored when an earlier case read it,
    and saved for later cases otherwise; without, the prompt is read from an empty memory.
    """
    prompt = build_passkey_prompt(engine.tokenizer, case.length, case.depth, case.seed,
                                  chat_template=plan.chat_template, answer_prefix=plan.answer_prefix)
    ids = prompt.ids[:-1]  # all but the last token go through feed; generate needs at least one prompt token
    chunk = engine.prefill_chunk
    shared = (prompt.needle_token // chunk) * chunk
    reused = checkpoints.resume(ids[:shared]) if checkpoints is not None else 0
    if checkpoints is None:
        engine.reset()

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(reused + done, len(ids))

    start = time.perf_counter()
    if checkpoints is not None and shared > reused:
        engine.feed(ids[reused:shared], progress=report)
        checkpoints.save(ids[:shared])
        report(shared - reused, len(ids))
        engine.feed(ids[shared:], progress=lambda done, total: report(shared - reused + done, total))
    else:
        engine.feed(ids[reused:], progress=report)
    prefill_s = time.perf_counter() - start
    fed = len(ids) - reused
    params = SamplingParams(temperature=0.0, max_new_tokens=plan.max_new_tokens)
    answer, answer_tokens, decode_ms, stats = "", 0, None, None
    for step in engine.generate(prompt.ids[-1:], params):
        answer += step.text
        answer_tokens += 1
        decode_ms, stats = step.decode_ms_per_token, step.memory
    return {
        "tokens": len(prompt.ids),
        "key": prompt.key,
        "answer": answer,
        "answer_tokens": answer_tokens,
        "correct": is_correct(prompt.key, answer),
        "needle_token": prompt.needle_token,
        "actual_depth": prompt.actual_depth,
        "reused_tokens": reused,  # read by an earlier case (restored from its snapshot)
        "prefill_s": prefill_s,  # for the tokens read by this case
        "prefill_tokens_per_s": fed / prefill_s if prefill_s > 0 else None,
        "decode_ms_per_token": decode_ms,
        "memory": {field: getattr(stats, field) for field in stats.__dataclass_fields__},
    }


def run_passkey(model, tokenizer, model_id: str, runs: list[MethodRun], plan: PasskeyPlan, log: ResultLog,
                console=None) -> list[dict[str, Any]]:
    """Run every case not yet in `log`, appending each record as it finishes; return the new records."""
    from rich.markup import escape

    from inf_llm.bench.display import make_progress

    cases = plan_cases(runs, plan)
    pending = [case for case in cases if not log.done(KIND, case.key(model_id, plan))]
    if len(pending) < len(cases):
        logger.info("%d of %d passkey cases are already in %s", len(cases) - len(pending), len(cases), log.path)
    machine = machine_info()
    new = []
    engine = checkpoints = engine_for = None  # one engine (and its checkpoints) per method and length
    with make_progress(console) as progress:
        overall = progress.add_task("passkey cases", total=len(pending))
        reading = progress.add_task("reading", total=1, visible=False)
        for case in pending:
            run = case.run
            description = f"{run.label} {case.length} tokens, depth {case.depth:.0%}, seed {case.seed}"
            progress.update(reading, description=description, completed=0, total=case.length, visible=True)

            def advance(done: int, total: int) -> None:
                progress.update(reading, completed=done, total=total)

            if engine_for != (run, case.length):
                engine = checkpoints = None  # the previous engine's memory is freed before this one fills
                engine = Engine(model, tokenizer, run.config, prefill_chunk=plan.prefill_chunk)
                checkpoints, engine_for = Checkpoints(engine), (run, case.length)
            result = run_case(engine, case, plan, advance, checkpoints)
            record = log.append(KIND, case.key(model_id, plan), label=run.label, config=run.config.to_dict(),
                                machine=machine, **result)
            new.append(record)
            mark = "[green]found[/green]" if result["correct"] else "[red]missed[/red]"
            answer = escape(repr(result["answer"]))
            progress.console.print(f"{description}: {mark} key {result['key']}, answer {answer}, "
                                   f"{result['prefill_tokens_per_s']:.0f} tokens/s")
            progress.advance(overall)
        progress.update(reading, visible=False)
    del engine, checkpoints
    return new
