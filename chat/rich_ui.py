"""`--style rich`: prompt-toolkit for input, rich for output.

- Input: prompt-toolkit, with bracketed paste (a pasted document arrives as one message, newlines included,
  with or without `--multiline`) and the memory statistics in the bottom toolbar while waiting.
- Reading a long message: a rich progress bar (tokens, tokens/s, time left).
- The reply streams as markdown in a rich `Live`, with the statistics under it. `Live` is stopped before the
  next prompt: a running `Live` hides what the user types.
"""

from __future__ import annotations

from collections.abc import Callable

from prompt_toolkit import PromptSession
from prompt_toolkit.history import InMemoryHistory
from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from inf_llm.generation.engine import GenerationStep

from chat.conversation import Reply

# Below this many tokens a message is read in about a second: no bar.
PROGRESS_MIN_TOKENS = 512


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- tok/s" if speed is None else f"{speed:,.0f} tok/s", style="progress.data.speed")


class _RichTurn:
    def __init__(self, console: Console, status: Callable[[GenerationStep | None], str]):
        self.console, self.status = console, status
        self.bar: Progress | None = None
        self.task = None
        self.live: Live | None = None
        self.text = ""

    def progress(self, done: int, total: int) -> None:
        if total < PROGRESS_MIN_TOKENS:
            return
        if self.bar is None:
            self.bar = Progress(TextColumn("reading"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                                _TokensPerSecond(), TextColumn("left"), TimeRemainingColumn(),
                                console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("reading", total=total)
        self.bar.update(self.task, completed=done, total=total)

    def _stop_bar(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def step(self, step: GenerationStep) -> None:
        self._stop_bar()
        self.text += step.text
        if self.live is None:
            self.live = Live(console=self.console, refresh_per_second=8, vertical_overflow="visible")
            self.live.start()
        self.live.update(Group(Markdown(self.text), Text(self.status(step), style="dim")))

    def close(self, reply: Reply | None) -> None:
        self._stop_bar()
        if self.live is not None:
            # The final frame: the reply alone; the statistics move to a line of their own.
            self.live.update(Markdown(self.text), refresh=True)
            self.live.stop()
            self.live = None
        if reply is not None:
            speed = f", {1000 / reply.decode_ms_per_token:.1f} tok/s" if reply.decode_ms_per_token else ""
            note = " (stopped)" if reply.finish_reason == "interrupted" else ""
            self.console.print(Text(f"[read {reply.prompt_tokens:,} tokens, wrote {reply.generated_tokens:,}"
                                    f"{speed}]{note}", style="dim"))


class RichUI:
    def __init__(self, status: Callable[[GenerationStep | None], str], *, user: str = "USER",
                 multiline: bool = False, console: Console | None = None):
        self.status = status
        self.console = console or Console()
        self.user = user
        self.multiline = multiline
        self.prompt = PromptSession(history=InMemoryHistory(), multiline=multiline,
                                    bottom_toolbar=lambda: " " + status(None), enable_history_search=False)

    def read_message(self) -> str:
        hint = " (Esc Enter to send)" if self.multiline else ""
        return self.prompt.prompt(f"{self.user}{hint}: ")

    def turn(self) -> _RichTurn:
        return _RichTurn(self.console, self.status)

    def info(self, text: str) -> None:
        self.console.print(Text(text, style="cyan"))

    def error(self, text: str) -> None:
        self.console.print(Text(f"error: {text}", style="bold red"))

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        table = Table(title=title, show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for name, value in rows:
            table.add_row(name, value)
        self.console.print(table)
