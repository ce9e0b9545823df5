"""How a transcript becomes tokens: the tokenizer's own chat template, or a fastchat conversation template.

The chat keeps its transcript as messages (`{"role": "user" | "assistant", "content": str}`) and never as
tokens: a `ChatFormat` renders the whole transcript to token ids, and the memory is made to hold exactly that
rendering (see `conversation.py`). The system message is part of the format, not of the transcript, so that
`!!remove` and `!!reset` never touch it.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

TOKENIZER_TEMPLATE = "tokenizer"  # the name recorded in sessions for "the tokenizer's own chat template"
# fastchat is installed without its dependencies (a web server stack we do not use), so not by setup.py.
FASTCHAT_INSTALL_HINT = "pip install --no-deps fschat==0.2.36"


class ChatFormatError(ValueError):
    """No usable chat template: the message says which option to give."""


@dataclass(frozen=True)
class ChatFormat:
    """Renders messages to token ids with one template and one system message.

    template: a fastchat template name, or `TOKENIZER_TEMPLATE` for the tokenizer's `chat_template`.
    system_message: None keeps the template's own default (SmolLM2's template, for one, has one).
    """

    tokenizer: object
    template: str = TOKENIZER_TEMPLATE
    system_message: str | None = None

    @classmethod
    def create(cls, tokenizer, template: str | None = None, system_message: str | None = None) -> ChatFormat:
        """Check the choice up front so that a typo fails at start-up, naming the valid choices."""
        if template is None or template == TOKENIZER_TEMPLATE:
            if not getattr(tokenizer, "chat_template", None):
                raise ChatFormatError(
                    "this tokenizer has no chat template; name a fastchat one with --conv-template "
                    "(e.g. vicuna_v1.1, llama-2, mistral, zephyr)")
            return cls(tokenizer, TOKENIZER_TEMPLATE, system_message)
        try:
            from fastchat.conversation import conv_templates
        except ModuleNotFoundError as error:
            if error.name is None or error.name.split(".")[0] != "fastchat":
                raise  # fastchat is there and something it imports is not: that is a real bug
            raise ChatFormatError(f"the conversation template {template!r} is fastchat's, and fastchat is not "
                                  f"installed; install it with `{FASTCHAT_INSTALL_HINT}`") from None

        if template not in conv_templates:
            close = difflib.get_close_matches(template, list(conv_templates), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ChatFormatError(f"unknown fastchat conversation template {template!r}{hint} "
                                  f"(known: {', '.join(sorted(conv_templates))})")
        return cls(tokenizer, template, system_message)

    @property
    def identity(self) -> dict:
        """What a saved session must agree on to be resumed with this format."""
        return {"template": self.template, "system_message": self.system_message}

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        if self.template == TOKENIZER_TEMPLATE:
            full = list(messages)
            if self.system_message is not None:
                full.insert(0, {"role": "system", "content": self.system_message})
            return self.tokenizer.apply_chat_template(full, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        conv = self._fastchat()
        for message in messages:
            conv.append_message(conv.roles[0 if message["role"] == "user" else 1], message["content"])
        if add_generation_prompt:
            conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the transcript; the empty transcript is no tokens (nothing said yet)."""
        if not messages and not add_generation_prompt:
            return []
        text = self.render_text(messages, add_generation_prompt)
        # Chat templates write their own BOS; fastchat prompts rely on the tokenizer adding it.
        special = self.template != TOKENIZER_TEMPLATE
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def encode(self, text: str) -> list[int]:
        """Tokens of plain text (for counting), without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.template == TOKENIZER_TEMPLATE:
            return ()
        stop = self._fastchat().stop_str
        if stop is None:
            return ()
        return (stop,) if isinstance(stop, str) else tuple(stop)

    @property
    def assistant_name(self) -> str:
        if self.template == TOKENIZER_TEMPLATE:
            return "ASSISTANT"
        return self._fastchat().roles[1]

    @property
    def user_name(self) -> str:
        if self.template == TOKENIZER_TEMPLATE:
            return "USER"
        return self._fastchat().roles[0]

    def _fastchat(self):
        from fastchat.conversation import get_conv_template

        conv = get_conv_template(self.template)
        if self.system_message is not None:
            conv.set_system_message(self.system_message)
        return conv
