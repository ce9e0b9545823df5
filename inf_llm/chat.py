"""`python -m inf_llm.chat` and the `inf-llm-chat` console script: start the terminal chat (the `chat` package)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from chat.cli import main as chat_main

    return chat_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
