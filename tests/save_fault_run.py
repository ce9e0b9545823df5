"""Faults during a save, at many points: `python -m tests.save_fault_run [--every-call] [--delays N] [--seed S]`.

For each kind of save (tests/test_save_faults.py: incremental, after a rollback, a new generation, a first save)
it makes the k-th write, pwrite, fsync, replace or ftruncate fail with ENOSPC and with EIO, and SIGKILLs a forked
saving process at the k-th call: at the first and last call of each step of the save (every call with
--every-call). Then it SIGKILLs saves of a long session (a 3,000-token document) after seeded random delays.
After each case the session must open at its previous save or its new one with the exact logits of a process
that never failed, and (after an error) the retry in the same process, or (after a kill) a resumed chat, must
save again. Prints a table: fault class, cases tried, recovered, refused cleanly, lost anything.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch

from inf_llm.model.loading import load_model
from inf_llm.sessions.names import DATA_DIR_ENV, SessionError
from inf_llm.sessions.store import resume_session
from tests.test_chat_conversation import MESSAGES, VOCAB
from tests.test_save_faults import (KINDS, base_session, boundaries, commit_point, dry_run, killed_save,
                                    opened_logits, run_failing_save, run_killed_save, same, save)
from tests.test_sessions import conversation, probe_logits
from tests.tiny_models import tiny_model

DOCUMENT = "The tide turns twice a day; the harbour master writes down each ship that comes in. " * 180


class Tally:
    def __init__(self):
        self.rows: dict[str, list[int]] = {}

    def add(self, fault: str, outcome: str) -> None:
        row = self.rows.setdefault(fault, [0, 0, 0, 0])
        row[0] += 1
        row[{"recovered": 1, "refused": 2, "lost": 3}[outcome]] += 1

    def run(self, fault: str, where: str, case, folder: Path) -> None:
        """Count `case()`'s outcome ("recovered" or "refused") under `fault`; any exception is a loss, printed with
        `where`. The case's folder is removed either way."""
        try:
            self.add(fault, case())
        except Exception:
            print(f"LOST: {where}")
            traceback.print_exc()
            self.add(fault, "lost")
        shutil.rmtree(folder, ignore_errors=True)

    def print(self) -> None:
        header = ("fault class", "cases tried", "recovered", "refused cleanly", "lost anything")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for fault, row in self.rows.items():
            print(f"| {fault} | " + " | ".join(str(n) for n in row) + " |", flush=True)


def prepared(model, tokenizer, root: Path, kind: str, tag: str):
    """A save of `kind` ready to fail: its base folder, the logits of its previous save (None for a first save),
    the calls a dry run of it made, and the call that commits it."""
    base = root / f"{kind}-base.session"
    previous = base_session(model, tokenizer, base) if kind != "first save" else None
    calls = dry_run(model, tokenizer, kind, base, root / f"{kind}-{tag}.session")
    return base, previous, calls, commit_point(calls)


def error_cases(model, tokenizer, root: Path, tally: Tally, every_call: bool) -> None:
    for kind in KINDS:
        base, previous, calls, commit = prepared(model, tokenizer, root, kind, "dry")
        points = range(1, len(calls) + 1) if every_call else boundaries(calls)
        for code in (errno.ENOSPC, errno.EIO):
            for at in points:
                folder = root / f"{kind}-{errno.errorcode[code]}-{at}.session"

                def case(code=code, at=at, folder=folder) -> str:
                    raised = run_failing_save(model, tokenizer, kind, base, previous, folder, at, code)
                    assert raised == (at <= commit), f"raised {raised} at call {at} (commit at {commit})"
                    return "recovered"

                tally.run(f"{errno.errorcode[code]} at a {calls[at - 1]}",
                          f"{kind}, {errno.errorcode[code]} at call {at} ({calls[at - 1]})", case, folder)


def resumed_and_saved(model, tokenizer, folder: Path) -> None:
    """A new process resumes what the crash left, chats and saves; the session opens at that save."""
    conv = conversation(model, tokenizer)
    conv.load(resume_session(folder, conv.engine, conv.format.identity).messages)
    conv.ask(MESSAGES[2])
    save(conv, folder)
    assert same(opened_logits(model, tokenizer, folder), probe_logits(conv))


def kill_cases(model, tokenizer, root: Path, tally: Tally, every_call: bool) -> None:
    for kind in KINDS:
        base, previous, calls, commit = prepared(model, tokenizer, root, kind, "kdry")
        for at in range(1, len(calls) + 1) if every_call else boundaries(calls):
            folder = root / f"{kind}-kill-{at}.session"

            def case(at=at, folder=folder) -> str:
                outcome = run_killed_save(model, tokenizer, kind, base, previous, folder, at=at, commit=commit)
                if isinstance(outcome, SessionError):
                    return "refused"
                resumed_and_saved(model, tokenizer, folder)
                return "recovered"

            tally.run(f"SIGKILL at a {calls[at - 1]} ({kind})", f"{kind}, SIGKILL at call {at} ({calls[at - 1]})",
                      case, folder)


def delay_cases(model, tokenizer, root: Path, tally: Tally, count: int, rng: random.Random) -> None:
    """SIGKILL after a random delay within the save of a long session: its first save (every block), then a save
    after one more turn (the new blocks and the state)."""
    long = conversation(model, tokenizer)
    long.ask(DOCUMENT)
    long.ask(MESSAGES[0])
    tokens = len(long.engine.tokens)
    base = root / "long-base.session"
    started = time.perf_counter()
    save(long, root / "long-timing.session")
    duration = time.perf_counter() - started
    save(long, base)
    previous = probe_logits(long)
    for index in range(count):
        first = index % 2 == 0
        folder = root / f"long-{index}.session"
        fault = f"SIGKILL after a random delay ({'first save' if first else 'incremental'}, {tokens:,} tokens)"

        def case(first=first, folder=folder) -> str:
            if first:
                conv, before = long, None
            else:
                shutil.copytree(base, folder)
                conv = conversation(model, tokenizer)
                conv.load(resume_session(folder, conv.engine, conv.format.identity).messages)
                conv.ask(MESSAGES[3])
                before = previous
            new = probe_logits(conv)
            killed_save(conv, folder, delay=rng.uniform(0, 1.2 * duration))
            got = opened_logits(model, tokenizer, folder)
            if isinstance(got, SessionError) or (first and not folder.exists()):
                assert first, got  # only a first save killed before its commit leaves no session
                return "refused"
            assert same(got, new) or (before is not None and same(got, before)), "opened at neither save"
            resumed_and_saved(model, tokenizer, folder)
            return "recovered"

        tally.run(fault, f"delay case {index}", case, folder)
    print(f"(a first save of the long session took {1000 * duration:.0f} ms here; delays drawn in 0..1.2x that)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every-call", action="store_true", help="every call of each save, not each step's ends")
    parser.add_argument("--delays", type=int, default=10, help="random-delay kills of the long session's saves")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("errors", "kills", "delays"), nargs="*", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="inf-llm-save-faults-") as tmp:
        os.environ[DATA_DIR_ENV] = tmp
        root = Path(tmp)
        model, tokenizer = tiny_model("llama", vocab_size=VOCAB), load_model()[1]
        torch.manual_seed(args.seed)
        tally = Tally()
        only = set(args.only or ("errors", "kills", "delays"))
        if "errors" in only:
            error_cases(model, tokenizer, root, tally, args.every_call)
            tally.print()  # after each class too: a partial run still reports
        if "kills" in only:
            kill_cases(model, tokenizer, root, tally, args.every_call)
            tally.print()
        if "delays" in only:
            delay_cases(model, tokenizer, root, tally, args.delays, random.Random(args.seed))
            tally.print()


if __name__ == "__main__":
    main()
