"""Long-document tasks over natural prose, in the style of RULER (Hsieh et al., 2024, arXiv 2404.06654).

Each prompt is what a chat user sends: one user message holding an instruction, a document of natural prose
(`corpus.py`) with a few "needle" sentences placed in it, and a question; rendered with the tokenizer's chat
template and its generation prompt, with no start of the answer given. The answer is scored by exact match of the
expected values (each must appear as a whole number in the reply).

Tasks (the target needle sits at the case's depth; the other needles at depths drawn from the seed):

- `single`: one needle "One of the special magic numbers for WORD is: NNNNNNN."; asked for WORD's number.
- `multikey`: the target plus three distractor needles for other words; asked for the target's number.
- `multivalue`: four needles for the same word, four numbers; asked for all of them.
- `multiquery`: four needles for four words; asked for the four numbers.
- `twohop`: "The WORD code is kept in the COLOUR drawer." and, elsewhere, "The COLOUR drawer holds the number
  NNNNNNN."; asked for the number in the drawer that keeps the WORD code: the answer needs both facts.

`dialogue_of` splits a case as a chat user who pastes the document first asks it: the document as one message, then
each question as a message of its own (`prose --dialogue`).

Everything is a pure function of (tokenizer, task, length, depth, seed) and the corpus.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from inf_llm.bench.corpus import load_paragraphs

TASKS = ("single", "multikey", "multivalue", "multiquery", "twohop")
# Bump when the wording, the corpus cleaning or the layout changes, so older results are not mistaken for these.
PROMPT_VERSION = 1

INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
         "I will quiz you about the numbers afterwards.")
WORDS = ("apple", "river", "candle", "falcon", "garden", "harbor", "island", "jacket", "kettle", "ladder",
         "meadow", "needle", "orchard", "pepper", "quartz", "rocket", "saddle", "tiger", "umbrella", "violin",
         "walnut", "yogurt", "zebra", "anchor", "bridge", "cactus", "dolphin", "engine", "feather", "glacier",
         "hammer", "igloo", "jungle", "kitten", "lantern", "marble", "nectar", "oyster", "pillow", "quiver",
         "raven", "silver", "tunnel", "velvet", "window", "yellow", "blanket", "compass", "dragon", "emerald")
COLOURS = ("red", "blue", "green", "black", "white", "orange", "purple", "brown", "grey", "golden")
MAX_NEW_TOKENS = {"single": 32, "multikey": 32, "twohop": 32, "multivalue": 96, "multiquery": 96}
QUESTION = "What is the special magic number for {} mentioned in the provided text?"
MAGIC = "One of the special magic numbers for {} is: {}."


@dataclass(frozen=True)
class ProsePrompt:
    task: str
    ids: list[int]  # the whole prompt, chat template and generation prompt included
    question: str
    answers: tuple[str, ...]  # every value the reply must contain
    needles: tuple[tuple[int, int], ...]  # token range [start, end) of each needle sentence in `ids`
    needle_texts: tuple[str, ...]
    target: int  # index in `needles` of the needle placed at the case's depth
    context: tuple[int, int]  # token range of the document (needles included)
    content: str  # the user message (instruction, document, question); `ids` is its chat rendering

    @property
    def answer_needles(self) -> tuple[int, ...]:
        """Indices of the needles the answer needs (all but the distractors)."""
        return tuple(i for i, text in enumerate(self.needle_texts) if any(a in text for a in self.answers)
                     or self.task == "twohop")


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _needles(task: str, rng: random.Random) -> tuple[list[str], tuple[str, ...], str]:
    """(needle sentences, target first; answers; question)."""
    words = rng.sample(WORDS, 4)
    if task in ("single", "multikey"):
        values = [_number(rng) for _ in range(4)]
        needles = [MAGIC.format(words[0], values[0])]
        if task == "multikey":
            needles += [MAGIC.format(w, v) for w, v in zip(words[1:], values[1:])]
        return needles, (values[0],), QUESTION.format(words[0])
    if task == "multivalue":
        values = [_number(rng) for _ in range(4)]
        return ([MAGIC.format(words[0], v) for v in values], tuple(values),
                f"What are all the special magic numbers for {words[0]} mentioned in the provided text?")
    if task == "multiquery":
        values = [_number(rng) for _ in range(4)]
        asked = ", ".join(words[:3]) + f" and {words[3]}"
        return ([MAGIC.format(w, v) for w, v in zip(words, values)], tuple(values),
                f"What are the special magic numbers for {asked} mentioned in the provided text?")
    if task == "twohop":
        colour, value = rng.choice(COLOURS), _number(rng)
        return ([f"The {words[0]} code is kept in the {colour} drawer.", f"The {colour} drawer holds the number {value}."],
                (value,), f"What is the number held by the drawer in which the {words[0]} code is kept?")
    raise ValueError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")


def _other_depths(count: int, depth: float, rng: random.Random) -> list[float]:
    # Away from the target's depth, so that needles never merge into one passage.
    depths: list[float] = []
    while len(depths) < count:
        d = rng.random()
        if all(abs(d - other) > 0.08 for other in [depth, *depths]):
            depths.append(d)
    return depths


def _sentence_starts(text: str) -> list[int]:
    """Character offsets where a sentence (or paragraph) of the document starts."""
    return [0] + [m.end() for m in re.finditer(r"(?<=[.!?'\"])\s+(?=[A-Z'\"(])", text)]


def _insert(document: str, needles: list[str], depths: list[float]) -> tuple[str, list[int]]:
    """The document with each needle inserted at the sentence start nearest its depth; needle character offsets."""
    starts = _sentence_starts(document)
    places = []
    for depth in depths:
        place = min(starts, key=lambda s: abs(s - depth * len(document)))
        places.append(place)
    order = sorted(range(len(needles)), key=lambda i: (places[i], i))
    pieces, offsets, cursor, shift = [], [0] * len(needles), 0, 0
    for i in order:
        pieces.append(document[cursor : places[i]])
        offsets[i] = places[i] + shift
        pieces.append(needles[i] + " ")
        shift += len(needles[i]) + 1
        cursor = places[i]
    pieces.append(document[cursor:])
    return "".join(pieces), offsets


def render(tokenizer, content: str) -> str:
    """One user message with the tokenizer's chat template and its generation prompt (the chat's first turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the prose benchmark asks as a chat user does: the tokenizer needs a chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def build_prose_prompt(tokenizer, task: str, length: int, depth: float, seed: int,
                       paragraphs: tuple[str, ...] | None = None) -> ProsePrompt:
    """A prompt of about `length` tokens (within a sentence) for one case."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} is invalid: must be in [0, 1] (a fraction of the document)")
    paragraphs = load_paragraphs() if paragraphs is None else paragraphs
    rng = random.Random(f"prose:{task}:{seed}:{length}:{depth}")
    needles, answers, question = _needles(task, rng)
    depths = [depth, *_other_depths(len(needles) - 1, depth, rng)]
    start = random.Random(f"prose-start:{seed}").randrange(len(paragraphs))

    def build(n_chars: int) -> tuple[str, str, list[int], str]:
        body, index = [], start
        while sum(len(p) + 2 for p in body) < n_chars:
            body.append(paragraphs[index % len(paragraphs)])
            index += 1
            if index - start > 4 * len(paragraphs):
                raise ValueError(f"length={length} needs more text than the corpus holds four times over")
        document = "\n\n".join(body)[:n_chars]
        document = document[: max(_sentence_starts(document)[-1] - 1, 0)] if len(document) >= n_chars else document
        document, offsets = _insert(document.rstrip(), needles, depths)
        content = f"{INTRO}\n\n{document}\n\n{question}"
        return render(tokenizer, content), document, offsets, content

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    base = count(build(0)[0])
    if length <= base + 64:
        raise ValueError(f"length={length} is too short: the instruction, needles and question take {base} tokens")
    chars = 4 * (length - base)
    for _ in range(4):
        text, document, offsets, content = build(chars)
        n = count(text)
        if abs(n - length) <= 32:
            break
        chars = max(1, round(chars * (length - base) / max(n - base, 1)))
    encoding = tokenizer(text, add_special_tokens=False)
    doc_char = text.index(document)

    def token_at(char: int) -> int:
        token = encoding.char_to_token(char)
        if token is None:
            raise AssertionError(f"no token covers character {char} of the prose prompt")
        return token

    spans = tuple((token_at(doc_char + o), token_at(doc_char + o + len(s) - 1) + 1) for o, s in zip(offsets, needles))
    return ProsePrompt(task=task, ids=list(encoding["input_ids"]), question=question, answers=answers,
                       needles=spans, needle_texts=tuple(needles), target=0,
                       context=(token_at(doc_char), token_at(doc_char + len(document) - 1) + 1), content=content)


@dataclass(frozen=True)
class Dialogue:
    """A case asked as a chat user who pastes the document first: `paste` (the instruction and the document) is one
    message, then each question its own message, with the numbers its reply must contain."""

    paste: str
    questions: tuple[tuple[str, tuple[str, ...]], ...]


def dialogue_of(prompt: ProsePrompt) -> Dialogue:
    """The case's document as a message of its own, then its question; `multiquery` asks its four words one message at
    a time (what one message asks at once, a chat user also asks in turns), each for its own number."""
    paste = prompt.content[: len(prompt.content) - len(prompt.question)].rstrip()
    if prompt.task != "multiquery":
        return Dialogue(paste, ((prompt.question, prompt.answers),))
    pattern = re.compile(re.escape(MAGIC).replace(re.escape("{}"), "(.+?)"))
    asked = (pattern.fullmatch(text).groups() for text in prompt.needle_texts)  # (word, number) of each needle
    return Dialogue(paste, tuple((QUESTION.format(word), (value,)) for word, value in asked))


def score(answers: tuple[str, ...], reply: str) -> float:
    """Fraction of the expected numbers that appear in the reply as whole numbers (not inside a longer one)."""
    found = sum(1 for a in answers if re.search(rf"(?<!\d){re.escape(a)}(?!\d)", reply))
    return found / len(answers)
