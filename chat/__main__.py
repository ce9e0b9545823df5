"""`python -m chat` is the same as `python -m inf_llm.chat`."""

from chat.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
