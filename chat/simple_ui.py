"""`--style simple`: plain text for scripts and pipes. No colours, no cursor movement, no progress bars.

stdout carries the replies (`ASSISTANT: ...`, one per input message, ending with a newline) and the output of
`!!stats` / `!!help`; stderr carries notices and errors. The `USER: ` prompt is shown only on a terminal.
One input line is one message; with `--multiline`, a message is the lines up to an empty line.
"""

from __future__ import annotations

import sys
from typing import TextIO

from inf_llm.generation.engine import GenerationStep

from chat.conversation import Reply


class _SimpleTurn:
    def __init__(self, out: TextIO, assistant: str):
        self.out, self.assistant, self.started = out, assistant, False

    def progress(self, done: int, total: int) -> None:
        pass

    def step(self, step: GenerationStep) -> None:
        if not self.started:
            self.out.write(f"{self.assistant}: ")
            self.started = True
        self.out.write(step.text)
        self.out.flush()

    def close(self, reply: Reply | None) -> None:
        if reply is not None and not self.started:
            self.out.write(f"{self.assistant}: ")
            self.started = True
        if self.started:
            self.out.write("\n")
            self.out.flush()


class SimpleUI:
    def __init__(self, *, user: str = "USER", assistant: str = "ASSISTANT", multiline: bool = False,
                 stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.user, self.assistant, self.multiline = user, assistant, multiline
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.interactive = self.stdin.isatty() and self.stdout.isatty()

    def _read_line(self, prompt: str) -> str:
        if self.interactive:
            return input(prompt)  # EOFError on Ctrl-D
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n").rstrip("\r")

    def read_message(self) -> str:
        if not self.multiline:
            return self._read_line(f"{self.user}: ")
        lines: list[str] = []
        prompt = f"{self.user} (end with an empty line): "
        while True:
            try:
                line = self._read_line(prompt if not lines else "")
            except EOFError:
                if lines:
                    return "\n".join(lines)
                raise
            if not line and lines:
                return "\n".join(lines)
            if line:
                lines.append(line)

    def turn(self) -> _SimpleTurn:
        return _SimpleTurn(self.stdout, self.assistant)

    def info(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=self.stderr, flush=True)

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        width = max((len(name) for name, _ in rows), default=0)
        print(f"{title}:", file=self.stdout)
        for name, value in rows:
            print(f"  {name.ljust(width)}  {value}", file=self.stdout)
        self.stdout.flush()
