"""The `!!` commands: parsing, and the help text that says what each one costs.

fastchat's commands (`!!exit`, `!!reset`, `!!remove`, `!!regen`, `!!save`, `!!load`) plus `!!file`, `!!stats`,
`!!sources`, `!!help`. Anything else starting with `!!` is refused (a typo must not be sent to the model as a message).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

PREFIX = "!!"

# name -> (usage, what it does and what it costs)
COMMANDS: dict[str, tuple[str, str]] = {
    "exit": ("!!exit", "end the chat (as does Ctrl-D); a named session is already saved"),
    "reset": ("!!reset", "start over: empty transcript and memory (instant); a saved session stays on disk and is no "
                         "longer saved to"),
    "remove": ("!!remove", "remove the last exchange; the memory rolls back to the snapshot before it "
                           "(instant; older than the kept snapshots: re-reads from the oldest one kept)"),
    "regen": ("!!regen", "regenerate the last reply from the snapshot taken after its prompt "
                         "(no re-reading; costs only the new reply)"),
    "save": ("!!save [NAME]", "save transcript + memory as session NAME (default: the current one) and keep "
                              "saving it after every turn (the first save writes every memory block: ~24 KB per "
                              "token for the embedded model, ~4.5 s at 32K tokens; each later save writes only what "
                              "is new: ~0.3 s after a turn); refused while another chat has NAME open"),
    "load": ("!!load [NAME]", "resume session NAME without re-reading it (~1 s at 32K tokens: the blocks are "
                              "mapped from disk, read when retrieval asks for them); refused while another chat has "
                              "NAME open; without NAME, list the saved sessions"),
    "file": ("!!file PATH [QUESTION]", "send a text file as your message; with QUESTION, the file is context and "
                                       "the question follows it in the same message (costs reading the file)"),
    "stats": ("!!stats", "show the memory and speed statistics"),
    "sources": ("!!sources", "show the passages the memory brought back into the last reply's attention, most "
                             "attended first (replays the reply: about as long as writing it again)"),
    "help": ("!!help", "show this help"),
}


@dataclass(frozen=True)
class Command:
    name: str
    args: tuple[str, ...]
    raw_args: str


class CommandError(ValueError):
    """A malformed or unknown command; the message says what to type instead."""


def is_command(line: str) -> bool:
    return line.lstrip().startswith(PREFIX)


def parse_command(line: str) -> Command:
    body = line.strip()[len(PREFIX):]
    name, _, rest = body.partition(" ")
    name = name.strip().lower()
    if name not in COMMANDS:
        raise CommandError(f"unknown command {PREFIX}{name}; type !!help for the list")
    try:
        args = tuple(shlex.split(rest))
    except ValueError as error:
        raise CommandError(f"cannot parse the arguments of {PREFIX}{name}: {error}") from None
    if name in ("exit", "reset", "remove", "regen", "stats", "sources", "help") and args:
        raise CommandError(f"{PREFIX}{name} takes no arguments")
    if name in ("save", "load") and len(args) > 1:
        raise CommandError(f"usage: {COMMANDS[name][0]}")
    if name == "file" and not args:
        raise CommandError(f"usage: {COMMANDS['file'][0]}")
    return Command(name, args, rest.strip())


def help_rows() -> list[tuple[str, str]]:
    return [COMMANDS[name] for name in COMMANDS]
