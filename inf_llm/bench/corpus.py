"""Natural English prose for the long-document benchmark, from a file a registry package ships.

The haystack must be ordinary prose, not repeated filler: with filler the needle is the only distinct content and
retrieval is trivially easy. We read two public-domain texts of the Canterbury compression corpus, which the
source distribution of `brotli` (MIT licensed, on PyPI) ships as test data:

- `alice29.txt`: Lewis Carroll, *Alice's Adventures in Wonderland* (Project Gutenberg etext, public domain);
- `lcet10.txt`: *Workshop on Electronic Texts, Proceedings* (Library of Congress, 1992; a work of the US
  government, public domain), a transcript of talks and discussions: plain expository and spoken prose.

Together about 140K tokens of the embedded model's tokenizer. `make corpus` (part of `make setup`) fetches the
archive with pip into the cache folder; nothing downloads at run time. The archive is read in place (tarfile).
Paragraphs are re-flowed (the files are hard-wrapped), Project Gutenberg's licence boilerplate, headings and
tables of contents are dropped. The result is one sequence of paragraphs, Alice then the Workshop; a haystack is a
run of consecutive paragraphs of it (read circularly) from a start chosen by the case's seed, so it reads as one
coherent document, as a pasted one would.
"""

from __future__ import annotations

import os
import re
import tarfile
from functools import lru_cache
from pathlib import Path

CORPUS_PACKAGE = "brotli==1.2.1"
CORPUS_ARCHIVE = "brotli-1.2.1.tar.gz"
CORPUS_MEMBERS = ("brotli-1.2.1/tests/testdata/alice29.txt", "brotli-1.2.1/tests/testdata/lcet10.txt")
CORPUS_ENV = "INF_LLM_CORPUS"
FETCH_HINT = f"pip download --no-deps --no-binary :all: {CORPUS_PACKAGE} -d {{folder}}"
# A paragraph shorter than this is a heading, a speaker's name or a table-of-contents line.
MIN_PARAGRAPH_CHARS = 120


class CorpusMissing(FileNotFoundError):
    """The prose corpus is not there; the message says how to fetch it."""


def corpus_path() -> Path:
    """`$INF_LLM_CORPUS` if set, else `<user cache>/inf-llm/corpus/brotli-1.2.1.tar.gz`."""
    if os.environ.get(CORPUS_ENV):
        return Path(os.environ[CORPUS_ENV]).expanduser()
    import platformdirs  # here, not at the top: the GPU script imports this package where it is missing

    return Path(platformdirs.user_cache_dir("inf-llm")).expanduser() / "corpus" / CORPUS_ARCHIVE


def clean_paragraphs(text: str) -> list[str]:
    """Re-flowed paragraphs of a hard-wrapped Project Gutenberg text, boilerplate and headings dropped."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        line = " ".join(block.split())
        if len(line) < MIN_PARAGRAPH_CHARS:
            continue
        lowered = line.lower()
        if "gutenberg" in lowered or "etext" in lowered or line.count("*") >= 3 or line.count(". . .") >= 2:
            continue
        # Prose ends a sentence and is mostly lower case; lists of names, addresses and contents are not.
        letters = [c for c in line if c.isalpha()]
        if line[-1] not in ".!?'\")" or sum(c.islower() for c in letters) < 0.85 * len(letters):
            continue
        # Backquote-quote pairs (`like this') are the etext's typewriter quotes: make them ordinary quotes.
        paragraphs.append(line.replace("`", "'"))
    return paragraphs


def load_paragraphs(path: str | Path | None = None) -> tuple[str, ...]:
    """The corpus (`path`, default `corpus_path()`) as paragraphs; raises CorpusMissing naming the command that
    fetches it."""
    return _load(Path(path) if path is not None else corpus_path())


@lru_cache(maxsize=4)
def _load(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise CorpusMissing(f"the prose corpus {path} is missing: run `make corpus`, or "
                            f"`{FETCH_HINT.format(folder=path.parent)}`")
    try:
        with tarfile.open(path, "r:gz") as archive:
            texts = []
            for member in CORPUS_MEMBERS:
                handle = archive.extractfile(member)
                if handle is None:
                    raise KeyError(member)
                texts.append(clean_paragraphs(handle.read().decode("latin-1")))
    except (tarfile.TarError, KeyError, OSError, EOFError) as error:
        raise CorpusMissing(f"{path} is not the {CORPUS_PACKAGE} source archive ({error}); fetch it again with "
                            f"`{FETCH_HINT.format(folder=path.parent)}`") from error
    return tuple(paragraph for text in texts for paragraph in text)
