"""The terminal front end of InfLLM chat: `python -m inf_llm.chat` (or `inf-llm-chat`).

One concept per module: `cli` (flags, start-up), `app` (the loop and the `!!` commands), `commands` (parsing,
help and costs), `conversation` (transcript <-> memory, rollback), `chat_format` (templates), `stats`,
`interrupts` (Ctrl-C), and the two front ends `simple_ui` and `rich_ui`. It uses the `inf_llm` library's
public API only.
"""

from chat.cli import main

__all__ = ["main"]
