"""The passkey prompt: a five-digit number hidden at a chosen depth in repeated filler text.

This is the retrieval task of the InfLLM paper (arXiv 2402.04617, section 4.2; from Mohtashami & Jaggi, 2023):
an instruction, the filler "The grass is green. The sky is blue. ..." repeated, one line "The pass key is NNNNN.
Remember it. NNNNN is the pass key." at `depth` (0 = first, 1 = last) of the filler, then the question. The
whole is one user message rendered with the tokenizer's chat template, followed by the start of the answer
("The pass key is"), so that a small model answers with the number rather than a preamble.

Everything is a pure function of (tokenizer, length, depth, seed): the same arguments give the same token ids.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
# Bump when the wording or layout changes, so results of another prompt are not mistaken for these.
PROMPT_VERSION = 1


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]  # the whole prompt, ready to feed
    key: str  # the five digits to find
    depth: float  # requested: fraction of the filler before the needle
    needle_token: int  # token range [needle_token, needle_end) of the needle line in `ids`
    needle_end: int
    context_start: int  # token range [context_start, context_end) of the filler, needle included
    context_end: int

    @property
    def actual_depth(self) -> float:
        """Where the needle landed: fraction of the filler's tokens (needle excluded) before it."""
        filler = (self.context_end - self.context_start) - (self.needle_end - self.needle_token)
        return (self.needle_token - self.context_start) / filler if filler else 0.0


def passkey_key(seed: int, length: int, depth: float) -> str:
    """The number hidden in a case; a string seed makes it stable across Python runs and platforms."""
    return str(random.Random(f"passkey:{seed}:{length}:{depth}").randint(10000, 99999))


def needle_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def _filler(start: int, count: int) -> str:
    return " ".join(FILLER[i % len(FILLER)] for i in range(start, start + count))


def render(tokenizer, before: int, after: int, key: str, *, chat_template: bool = True,
           answer_prefix: str = ANSWER_PREFIX) -> tuple[str, str, int]:
    """(text, context, needle_offset): the prompt with `before` filler sentences, the needle, then `after` more.

    context is the filler with the needle, verbatim in text; the needle starts at context[needle_offset:].
    """
    head = _filler(0, before)
    tail = _filler(before, after)
    needle = needle_line(key)
    context = "\n".join(part for part in (head, needle, tail) if part)
    content = f"{INTRO}\n\n{context}\n\n{QUESTION}"
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; run the passkey benchmark with --no-chat-template "
                             "for a base model")
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        text += answer_prefix
    else:
        text = f"{content}\n{answer_prefix}"
    return text, context, len(head) + 1 if head else 0


def _encode(tokenizer, text: str, chat_template: bool):
    # A chat template writes its own special tokens; a raw prompt gets the tokenizer's (e.g. BOS).
    encoding = tokenizer(text, add_special_tokens=not chat_template, return_offsets_mapping=False)
    if not encoding.encodings:
        raise ValueError("the passkey prompt needs a fast (Rust) tokenizer, to map the needle's characters to tokens")
    return encoding


def _token_at(encoding, char: int) -> int:
    token = encoding.char_to_token(char)
    if token is None:
        raise AssertionError(f"no token covers character {char} of the passkey prompt")
    return token


def build_passkey_prompt(tokenizer, length: int, depth: float, seed: int, *, chat_template: bool = True,
                         answer_prefix: str = ANSWER_PREFIX) -> PasskeyPrompt:
    """A prompt of about `length` tokens (within one filler sentence) with the key at `depth` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} is invalid: must be in [0, 1] (a fraction of the context)")
    key = passkey_key(seed, length, depth)

    def count(before: int, after: int) -> int:
        text = render(tokenizer, before, after, key, chat_template=chat_template, answer_prefix=answer_prefix)[0]
        return len(_encode(tokenizer, text, chat_template)["input_ids"])

    base = count(0, 0)
    if length <= base:
        raise ValueError(f"length={length} is too short: the passkey question alone takes {base} tokens")
    probe = 10 * len(FILLER)
    per_sentence = (count(0, probe) - base) / probe
    n = round((length - base) / per_sentence)
    for _ in range(3):
        # The filler tokenizes almost linearly; one or two corrections land within a sentence.
        before = round(depth * n)
        text, context, needle_offset = render(tokenizer, before, n - before, key, chat_template=chat_template,
                                    answer_prefix=answer_prefix)
        encoding = _encode(tokenizer, text, chat_template)
        ids = encoding["input_ids"]
        step = round((length - len(ids)) / per_sentence)
        if step == 0:
            break
        n = max(0, n + step)
    context_char = text.index(context)
    needle_char = context_char + needle_offset
    needle_last = needle_char + len(needle_line(key)) - 1
    return PasskeyPrompt(
        ids=list(ids),
        key=key,
        depth=depth,
        needle_token=_token_at(encoding, needle_char),
        needle_end=_token_at(encoding, needle_last) + 1,
        context_start=_token_at(encoding, context_char),
        context_end=_token_at(encoding, context_char + len(context) - 1) + 1,
    )


def is_correct(key: str, answer: str) -> bool:
    """The digits of the key appear, contiguous, in the answer."""
    return key in answer
