"""Hostile and damaged files: `python -m tests.fuzz_run --seed 0 --cases N [--only sessions|config]`.

Sessions: N seeded cases, each a copy of a saved session (a tiny random Llama, as the tests use; nothing is
downloaded) damaged one way: truncated at a random offset, bits flipped, two files swapped, a file (or a folder)
from another session (a later save of the same one, another conversation, another config), a `state.pt` that is
valid torch but not ours, one of ours forged with a wrong structure (and a recomputed checksum), symlinks to
files and folders outside it, a missing file, an empty file, extra unknown files. The chat then opens it
(`ChatApp.open_session`, read-only in a quarter of the cases). Each case is

- recovered: it resumed, its next-token logits equal those of the engine that saved that state (atol=0), a
  turn and a save went through, and the saved session opens at that turn's logits;
- refused cleanly: one line naming the session's folder (or the file) and the problem, and nothing on disk
  changed (names, sizes, modification times and bytes of everything around it); or it resumed and the damage
  was found when the turn read a block (a DiskTierError of one line naming the block's folder), with exact
  logits up to there and nothing outside the folder changed;
- LOST/WRONG: anything else (a traceback, other logits, a change outside the session's folder, a file written
  by a refusal).

Config: N seeded mutations of each preset in config/ and of the reference InfLLM's shipped files, loaded as the
chat loads `--inf-llm-config-path`: each must load to a valid InfLLMConfig, or raise ConfigError of one line
naming the file, which `python -m chat` prints as one line before exiting with status 2.

Prints each LOST/WRONG case, one example message per fault class, and a table per part.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import math
import os
import random
import shutil
import stat
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from inf_llm.sessions.digest import content_sha256
from inf_llm.sessions.names import DATA_DIR_ENV
from inf_llm.sessions.state_file import FORMAT_NAME, STATE_FILE
from inf_llm.sessions.store import release, resume_session, save_session
from inf_llm.storage.disk_tier import DiskTierError

CASE = "case"  # the name of the session each case opens
PARTS = ("sessions", "config")


# --- the tree around a session: what must not change -------------------------------------------------------------


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict:
    """Every entry under `root` (symlinks not followed): links with their target, folders with their mtime, files
    with size, mtime and a digest of their bytes. `skip`: relative paths left out (with what is under them)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if any(rel == s or rel.startswith(s + os.sep) for s in skip):
                continue
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mtime_ns)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest())
            else:
                out[rel] = ("other", stat.S_IFMT(st.st_mode), st.st_mtime_ns)
    return out


def changes(before: dict, after: dict) -> list[str]:
    return [f"{key}: {before.get(key)} -> {after.get(key)}" for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)]


# --- the sessions every case starts from --------------------------------------------------------------------------


@dataclass
class Corpus:
    """Saved sessions (folders under root/corpus) and the logits each saved state resumes to, by its sha256."""

    root: Path
    model: object
    tokenizer: object
    configs: dict = field(default_factory=dict)  # session -> InfLLMConfig it was saved with
    sha: dict = field(default_factory=dict)  # session -> sha256 of its state
    logits: dict = field(default_factory=dict)  # state sha256 -> probe logits of the engine that saved it

    def folder(self, name: str) -> Path:
        return self.root / "corpus" / f"{name}.session"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def session(self) -> Path:
        return self.data_dir / "sessions" / f"{CASE}.session"

    @property
    def outside(self) -> Path:
        return self.root / "outside"


def configs():
    from tests.test_chat_conversation import tiny_config

    # topk_blocks covers every block: the probe reads (and checks) every block of the session.
    return {"A": tiny_config(), "D": tiny_config(block_size=4, repr_tokens=2),
            "F": tiny_config(method="full")}


def build_corpus(root: Path, model, tokenizer) -> Corpus:
    """A: two turns; A2: A resumed, one more turn, saved again (same generation, more blocks); B: another
    conversation; D: A's turns under another config (block_size 4); F: full attention (state.pt only)."""
    from tests.test_chat_conversation import MESSAGES
    from tests.test_sessions import conversation

    corpus = Corpus(root, model, tokenizer)
    cfg = configs()
    plans = {"A": ("A", [MESSAGES[0], MESSAGES[1]]), "B": ("A", [MESSAGES[2], MESSAGES[3]]),
             "D": ("D", [MESSAGES[0], MESSAGES[1]]), "F": ("F", [MESSAGES[0], MESSAGES[1]])}
    for name, (config, turns) in plans.items():
        conv = conversation(model, tokenizer, cfg[config])
        for text in turns:
            conv.ask(text)
        _keep(corpus, name, conv, cfg[config])
    shutil.copytree(corpus.folder("A"), corpus.folder("A2"))
    conv = conversation(model, tokenizer, cfg["A"])
    conv.load(resume_session(corpus.folder("A2"), conv.engine, conv.format.identity).messages)
    conv.ask(MESSAGES[3])
    _keep(corpus, "A2", conv, cfg["A"])
    corpus.outside.mkdir()
    return corpus


def _keep(corpus: Corpus, name: str, conv, config) -> None:
    folder = corpus.folder(name)
    save_session(folder, conv.engine, conv.messages, conv.format.identity)
    release(conv.engine)  # the corpus folder receives nothing more
    sha = _state_sha(folder)
    corpus.configs[name], corpus.sha[name] = config, sha
    corpus.logits[sha] = probe_logits_of(corpus, folder, config)


def _state_sha(folder: Path) -> str | None:
    try:
        payload = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        return payload.get("sha256") if isinstance(payload, dict) else None
    except Exception:
        return None


def probe_logits_of(corpus: Corpus, folder: Path, config) -> torch.Tensor:
    """The probe's logits of a freshly resumed copy of `folder` (read-only: nothing written)."""
    from tests.test_sessions import conversation, probe_logits

    conv = conversation(corpus.model, corpus.tokenizer, config)
    conv.load(resume_session(folder, conv.engine, conv.format.identity, read_only=True).messages)
    return probe_logits(conv)


# --- session mutations: each changes corpus.session and returns (what it did, the sha the resume must equal) --------


def _files(folder: Path) -> list[Path]:
    """Files under `folder` (not following symlinks), in an order that does not depend on the random name of the
    generation folder."""
    found = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    return sorted(found, key=lambda p: [("g-" if part.startswith("g-") else part) for part in p.relative_to(folder).parts])


def _dirs(folder: Path) -> list[Path]:
    found = [p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: [("g-" if part.startswith("g-") else part) for part in p.relative_to(folder).parts])


def _rel(path: Path, folder: Path) -> str:
    parts = path.relative_to(folder).parts
    return "/".join("g-*" if part.startswith("g-") else part for part in parts)


def _pick_file(rng: random.Random, folder: Path) -> Path:
    files = _files(folder)
    state = folder / STATE_FILE
    # state.pt is one file of 13 in a windowed session; give it a quarter of the cases.
    if state in files and rng.random() < 0.25:
        return state
    return rng.choice(files)


def truncation(rng, corpus, target):
    path = _pick_file(rng, corpus.session)
    size = path.stat().st_size
    at = rng.randrange(size) if size else 0
    with open(path, "r+b") as handle:
        handle.truncate(at)
    return f"{_rel(path, corpus.session)} cut at {at} of {size} bytes", corpus.sha[target]


def bit_flip(rng, corpus, target):
    path = _pick_file(rng, corpus.session)
    data = bytearray(path.read_bytes())
    if not data:
        return truncation(rng, corpus, target)
    flips = rng.choice((1, 1, 1, 2, 3, 8))
    offsets = sorted(rng.randrange(len(data)) for _ in range(flips))
    for offset in offsets:
        data[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"{_rel(path, corpus.session)}: {flips} bit(s) flipped at {offsets}", corpus.sha[target]


def swapped_files(rng, corpus, target):
    folder = corpus.session
    if rng.random() < 0.5:  # two entries (files or folders) of one folder
        parents = [d for d in [folder, *_dirs(folder)] if len(list(d.iterdir())) >= 2]
        parent = rng.choice(parents)
        a, b = rng.sample(sorted(parent.iterdir(), key=lambda p: p.name.startswith("g-") or p.name), 2)
    else:
        files = _files(folder)
        if len(files) < 2:
            return missing_file(rng, corpus, target)
        a, b = rng.sample(files, 2)
    tmp = a.with_name(a.name + ".swap")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)
    return f"swapped {_rel(a, folder)} and {_rel(b, folder)}", corpus.sha[target]


def from_another_session(rng, corpus, target):
    """A file or layer folder of another session put in place of this one's (same relative path)."""
    sources = [name for name in ("A", "A2", "B", "D", "F") if name != target and name in corpus.sha]
    source = rng.choice(sources)
    src_folder = corpus.folder(source)
    src_gen = [p for p in src_folder.iterdir() if p.name.startswith("g-")]
    mine_gen = [p for p in corpus.session.iterdir() if p.name.startswith("g-")]

    def mine(path: Path) -> Path:  # the same file in this session (its generation folder has another name)
        rel = path.relative_to(src_folder)
        if rel.parts[0].startswith("g-") and mine_gen:
            rel = Path(mine_gen[0].name, *rel.parts[1:])
        return corpus.session / rel

    candidates = [p for p in _files(src_folder) if mine(p).exists()]
    if src_gen and mine_gen and rng.random() < 0.25:
        layers = sorted(p for p in src_gen[0].iterdir() if p.is_dir())
        layer = rng.choice(layers)
        shutil.rmtree(mine(layer))
        shutil.copytree(layer, mine(layer))
        return f"{_rel(mine(layer), corpus.session)}/ from session {source}", corpus.sha[target]
    path = rng.choice(candidates)
    shutil.copyfile(path, mine(path))
    expect = corpus.sha[source] if path.name == STATE_FILE else corpus.sha[target]
    return f"{_rel(mine(path), corpus.session)} from session {source}", expect


class NotOurs:
    """An object of a class that is not in a session: torch.save pickles it, weights_only refuses it."""

    def __init__(self):
        self.format = FORMAT_NAME


def _foreign_payloads(corpus):
    payload = torch.load(corpus.session / STATE_FILE, weights_only=True) \
        if (corpus.session / STATE_FILE).is_file() else {}
    model_state = OrderedDict(list(corpus.model.state_dict().items())[:3])
    no_sha = {k: v for k, v in payload.items() if k != "sha256"} if isinstance(payload, dict) else {}
    return {
        "a dict with other keys": {"weights": torch.zeros(3), "step": 7},
        "a tensor": torch.arange(12).reshape(3, 4),
        "a list": [1, "two", torch.ones(2)],
        "a model's state_dict": model_state,
        "a string": "inf-llm-session",
        "None": None,
        "an object of another class": NotOurs(),
        "ours without its checksum": no_sha,
        "ours with version 3": {**no_sha, "version": 3},
        "ours as version 1 (a file format)": {**no_sha, "version": 1},
    }


def foreign_state(rng, corpus, target):
    kind, value = rng.choice(sorted(_foreign_payloads(corpus).items(), key=lambda kv: kv[0]))
    if kind in ("ours with version 3", "ours as version 1 (a file format)"):
        value = dict(value)
        value["sha256"] = content_sha256(value)
    torch.save(value, corpus.session / STATE_FILE)
    return f"state.pt is {kind}", None


WRONG_VALUES = [0, -1, 10**30, 2.5, float("nan"), True, None, "", "x", "../../outside", [], [1, "a"], {}, {"a": 1},
                torch.zeros(2, 2), torch.tensor(3)]


def _paths(value, prefix=()):
    """Every (path, value) in a payload's nested dicts and lists (tensors are leaves)."""
    yield prefix, value
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _paths(value[key], prefix + (key,))
    elif isinstance(value, list) and len(value) <= 8:  # transcripts and layers; not every token id
        for i, item in enumerate(value):
            yield from _paths(item, prefix + (i,))


def forged_state(rng, corpus, target):
    """Ours, with one value replaced by one of another type (or removed, or a generation elsewhere), and its
    checksum recomputed: the structure, not the checksum, must refuse it."""
    state = corpus.session / STATE_FILE
    payload = torch.load(state, weights_only=True)
    gen = (payload.get("blocks") or {}).get("generation")
    roll = rng.random()
    if gen and roll < 0.2:
        copy = corpus.outside / gen
        shutil.copytree(corpus.session / gen, copy)
        where = rng.choice([str(copy), os.path.relpath(copy, corpus.session), f"{gen}/../{gen}", f"../{CASE}.session/{gen}",
                            f"{gen}/layer-000/..", "", "."])
        payload["blocks"]["generation"] = where
        what = f"blocks.generation = {where!r}"
    else:
        paths = [p for p, _ in _paths(payload) if p and p[-1] != "sha256"]
        path = rng.choice(paths)
        parent = payload
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.2:
            del parent[path[-1]]
            what = f"{'.'.join(map(str, path))} removed"
        else:
            old = parent[path[-1]]
            # Of another type: a value of the same type (other tokens, another transcript) is content, which only
            # the checksum protects.
            value = rng.choice([v for v in WRONG_VALUES if type(v) is not type(old)])
            parent[path[-1]] = value
            shown = f"tensor{tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
            what = f"{'.'.join(map(str, path))} = {shown}"
    payload["sha256"] = content_sha256(payload)
    torch.save(payload, state)
    return f"forged state.pt: {what}", corpus.sha[target]


def symlinks(rng, corpus, target):
    folder = corpus.session
    kind = rng.choice(["file to a copy", "file to another file", "generation folder", "layer folder"])
    gens = [p for p in folder.iterdir() if p.name.startswith("g-")]
    if kind in ("generation folder", "layer folder") and gens:
        dirs = [gens[0]] if kind == "generation folder" else sorted(p for p in gens[0].iterdir() if p.is_dir())
        path = rng.choice(dirs)
        copy = corpus.outside / path.name
        shutil.move(path, copy)
    else:
        path = _pick_file(rng, folder)
        copy = corpus.outside / f"{path.parent.name}-{path.name}"
        shutil.move(path, copy)
        if kind == "file to another file":
            other = [p for p in _files(corpus.folder("B")) if p.name == path.name]
            shutil.copyfile(rng.choice(other) if other else corpus.folder("B") / STATE_FILE, copy)
    os.symlink(copy, path)
    return f"{_rel(path, folder)} is a symlink ({kind}) to {copy.relative_to(corpus.root)}", corpus.sha[target]


def missing_file(rng, corpus, target):
    folder = corpus.session
    if rng.random() < 0.3 and _dirs(folder):
        path = rng.choice(_dirs(folder))
        shutil.rmtree(path)
    else:
        path = _pick_file(rng, folder)
        path.unlink()
    return f"{_rel(path, folder)} removed", corpus.sha[target]


def empty_file(rng, corpus, target):
    path = _pick_file(rng, corpus.session)
    path.write_bytes(b"")
    return f"{_rel(path, corpus.session)} emptied", corpus.sha[target]


def extra_files(rng, corpus, target):
    folder = corpus.session
    made = []
    for _ in range(rng.randint(1, 3)):
        parent = rng.choice([folder, *_dirs(folder)])
        kind = rng.choice(["junk file", "g- folder", "layer folder", "state.pt.bak", "temp state", "fifo",
                           "symlink to a folder outside", "symlink to a file outside"])
        if kind == "junk file":
            path = parent / f"notes-{rng.randrange(1000)}.txt"
            path.write_bytes(rng.randbytes(rng.randrange(4096)))
        elif kind == "g- folder":
            path = folder / f"g-zz{rng.randrange(1000)}"
            path.mkdir(exist_ok=True)
            (path / "blocks.data").write_bytes(rng.randbytes(64))
        elif kind == "layer folder":
            gens = [p for p in folder.iterdir() if p.name.startswith("g-") and p.is_dir()]
            if not gens:
                continue
            layers = sorted(p for p in gens[0].iterdir() if p.is_dir() and p.name.startswith("layer-"))
            if not layers:
                continue
            path = gens[0] / "layer-002"
            if not path.exists():
                shutil.copytree(layers[0], path)
        elif kind == "state.pt.bak":
            path = folder / "state.pt.bak"
            path.write_bytes(rng.randbytes(100))
        elif kind == "temp state":
            path = folder / f".state.pt.tmp-{rng.randrange(1000)}"
            path.write_bytes(rng.randbytes(100))
        elif kind == "fifo":
            path = parent / f"fifo-{rng.randrange(1000)}"
            if not path.exists():
                os.mkfifo(path)
        else:
            outside = corpus.outside / f"target-{rng.randrange(1000)}"
            if kind == "symlink to a folder outside":
                outside.mkdir(exist_ok=True)
                (outside / "keep.txt").write_text("must stay\n")
                path = folder / f"g-link{rng.randrange(100)}"
            else:
                outside.write_text("must stay\n")
                path = parent / f"link-{rng.randrange(100)}"
            if not path.exists() and not path.is_symlink():
                os.symlink(outside, path)
        made.append(f"{kind} {_rel(path, folder)}")
    return "extra: " + ", ".join(made), corpus.sha[target]


SESSION_FAULTS = {
    "truncated at a random offset": truncation,
    "bit flips": bit_flip,
    "two files (or folders) swapped": swapped_files,
    "a file or folder from another session": from_another_session,
    "state.pt valid torch, not ours": foreign_state,
    "state.pt ours, forged structure (checksum recomputed)": forged_state,
    "symlinks to outside the folder": symlinks,
    "a missing file or folder": missing_file,
    "an empty file": empty_file,
    "extra unknown files": extra_files,
}


# --- one session case ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # "recovered", "refused", "lost"
    detail: str


def _one_line_naming(text: str, folder: Path) -> bool:
    names = (str(folder), str(folder.resolve()))
    return len(text.splitlines()) == 1 and any(name in text for name in names)


def run_session_case(corpus: Corpus, target: str, fault, rng: random.Random, read_only: bool) -> tuple[str, Outcome]:
    """Copy session `target` to the case's folder, damage it with `fault`, open it as the chat does, classify."""
    from chat.app import ChatApp
    from chat.simple_ui import SimpleUI
    from tests.test_chat_conversation import MESSAGES
    from tests.test_sessions import conversation, probe_logits

    folder = corpus.session
    shutil.rmtree(folder, ignore_errors=True)
    for child in corpus.outside.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    shutil.copytree(corpus.folder(target), folder)
    what, expect = fault(rng, corpus, target)
    lock = (f"data/sessions/.{CASE}.session.lock", f"data/sessions/.{CASE}.session.lock.info")
    parent = "data/sessions"
    before = snapshot(corpus.root, lock)
    before.pop(parent, None)  # its mtime changes with the lock's record (beside the session, not in it)

    def outside_changes(after_skip=()):
        now = snapshot(corpus.root, lock + after_skip)
        now.pop(parent, None)
        return changes({k: v for k, v in before.items() if not any(k == s or k.startswith(s + os.sep)
                                                                   for s in after_skip)}, now)

    conv = conversation(corpus.model, corpus.tokenizer, corpus.configs[target])
    stdout, stderr = io.StringIO(), io.StringIO()
    app = ChatApp(conv, SimpleUI(stdin=io.StringIO(""), stdout=stdout, stderr=stderr))
    try:
        try:
            opened = app.open_session(CASE, read_only=read_only)
        except BaseException:
            return what, Outcome("lost", "open_session raised:\n" + traceback.format_exc(limit=-4))
        message = stderr.getvalue().strip()
        if not opened:
            changed = outside_changes()
            if changed:
                return what, Outcome("lost", f"refused ({message}) but wrote: {changed[:4]}")
            if not (message.startswith("error: ") and _one_line_naming(message, folder)):
                return what, Outcome("lost", f"refusal is not one line naming the session: {message!r}")
            return what, Outcome("refused", message)
        if expect is None or expect not in corpus.logits:
            return what, Outcome("lost", f"resumed a state that is not any save ({message})")
        in_session = (str(folder.relative_to(corpus.root)),)
        try:
            got = probe_logits(conv)
        except DiskTierError as error:
            changed = outside_changes(in_session)
            if changed:
                return what, Outcome("lost", f"wrote outside the session: {changed[:4]}")
            if not _one_line_naming(str(error), folder):
                return what, Outcome("lost", f"block error is not one line naming the folder: {error}")
            return what, Outcome("refused", f"(resumed; the turn's read failed) {error}")
        except BaseException:
            return what, Outcome("lost", "the probe raised:\n" + traceback.format_exc(limit=-4))
        if not torch.equal(got, corpus.logits[expect]):
            return what, Outcome("lost", "WRONG: resumed with other logits than the save it holds")
        conv.ask(MESSAGES[2])
        saved = app.save()
        if not saved:
            return what, Outcome("lost", f"the save after the resume failed: {stderr.getvalue().strip()!r}")
        changed = outside_changes(() if read_only else in_session)
        if changed:
            return what, Outcome("lost", f"wrote outside the session{' (read-only)' if read_only else ''}: "
                                         f"{changed[:4]}")
        if not read_only:
            again = probe_logits_of(corpus, folder, corpus.configs[target])
            if not torch.equal(again, probe_logits(conv)):
                return what, Outcome("lost", "WRONG: the session saved after the resume opens with other logits")
        return what, Outcome("recovered", message.splitlines()[0] if message else "")
    finally:
        app.close()
        release(conv.engine)


# --- config mutations ----------------------------------------------------------------------------------------------


def config_seeds() -> dict[str, str]:
    """Each preset in config/ and the reference InfLLM's shipped files (as reproduced in tests/test_config.py)."""
    from inf_llm.config.presets import PRESET_DIR
    from tests import test_config

    seeds = {p.name: p.read_text(encoding="utf-8") for p in sorted(PRESET_DIR.glob("*.yaml"))}
    for name in ("MISTRAL_INF_LLM", "LLAMA_3_INF_LLM", "MISTRAL_STREAM_LLM", "MISTRAL_ORIGIN"):
        seeds[f"reference {name.lower()}"] = getattr(test_config, name)
    return seeds


WRONG_CONFIG_VALUES = [10**30, 2**63, 2**31, -1, -(10**30), 0, 1, 128.0, 0.5, float("nan"), float("inf"), "128", "",
                       "inf-llm", "lru-s", True, False, None, [], [1, 2], {"a": 1}, {"nested": {"deeper": [1]}}]


def _mutate_mapping(rng: random.Random, data: dict) -> str:
    mappings = [data] + ([data["model"]] if isinstance(data.get("model"), dict) else [])
    target = rng.choice(mappings)
    keys = sorted(target, key=str)
    op = rng.choice(["delete", "rename", "value", "value", "value", "add"])
    if op == "delete" and keys:
        key = rng.choice(keys)
        del target[key]
        return f"deleted {key!r}"
    if op == "rename" and keys:
        key = rng.choice(keys)
        name = str(key)
        i = rng.randrange(len(name) + 1)
        new = rng.choice([name[:i] + rng.choice("abcxyz_") + name[i + 1:], name.upper(), name + "s", f"model.{name}"])
        target[new] = target.pop(key)
        return f"renamed {key!r} to {new!r}"
    if op == "add":
        key = rng.choice(["extra", "n_local", "topk", "local_windw", "model", "max_len", 3, None])
        target[key] = rng.choice(WRONG_CONFIG_VALUES)
        return f"added {key!r}"
    key = rng.choice(keys) if keys else "method"
    value = rng.choice(WRONG_CONFIG_VALUES)
    target[key] = value
    return f"{key!r} = {value!r}"


def mutate_config(rng: random.Random, text: str) -> tuple[str, bytes | str]:
    """One random mutation of a YAML text: (what, the new content)."""
    kind = rng.choice(["structure", "structure", "structure", "bytes", "duplicate", "cut", "invalid", "not utf-8",
                       "empty", "top level", "nesting", "tag"])
    raw = text.encode("utf-8")
    if kind == "structure":
        data = yaml.safe_load(text)
        what = _mutate_mapping(rng, data)
        return f"structure: {what}", yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if kind == "bytes":
        data = bytearray(raw)
        for _ in range(rng.randint(1, 5)):
            op, at = rng.choice(["set", "insert", "delete"]), rng.randrange(len(data))
            if op == "set":
                data[at] = rng.randrange(256)
            elif op == "insert":
                data.insert(at, rng.randrange(256))
            else:
                del data[at]
        return "random byte changes", bytes(data)
    if kind == "duplicate":
        lines = [line for line in text.splitlines() if ":" in line and not line.lstrip().startswith("#")]
        line = rng.choice(lines)
        return f"duplicated line {line.strip()!r}", text + line + "\n"
    if kind == "cut":
        at = rng.randrange(len(raw) + 1)
        return f"cut at byte {at}", raw[:at]
    if kind == "invalid":
        bad = rng.choice(["local_window: [1\n", "\tmethod: full\n", "a: b: c\n", "- x\ny: 1\n", "key: 'open\n",
                          "{unclosed: 1\n", "? [a, b]\n: 1\n", "*undefined_alias\n", "%YAML 9.9\n---\na: 1\n"])
        return f"invalid YAML {bad!r}", text + bad
    if kind == "not utf-8":
        at = rng.randrange(len(raw) + 1)
        junk = rng.choice([b"\xff\xfe", b"\xc3", b"\x80abc", b"\xe9t\xe9"])
        return f"non-UTF-8 bytes {junk!r} at {at}", raw[:at] + junk + raw[at:]
    if kind == "empty":
        return "empty file", rng.choice([b"", b"\n", b"# only a comment\n", b"---\n", b"\xef\xbb\xbf"])
    if kind == "top level":
        body = rng.choice(["- method: full\n- local_window: 2\n", "42\n", "inf-llm\n", "null\n", "[1, 2]\n",
                           "!!binary aGVsbG8=\n", "3.5\n"])
        return f"top level {body.strip()!r}", body
    if kind == "nesting":
        depth = rng.choice([50, 2000, 20000])
        opener, closer = rng.choice([("[", "]"), ("{a: ", "}")])
        return f"a value nested {depth} deep", f"local_window: {opener * depth}1{closer * depth}\n"
    tag = rng.choice(["!!python/object:os.system {}", "!!python/name:os.system", "!custom 3", "!!set {a, b}",
                      "!!timestamp 2001-12-14", "!!float 128", "!!int '0x80'", "&x 64", "*x"])
    key = rng.choice(["local_window", "method", "topk_blocks", "disk_dir"])
    return f"tag {key}: {tag}", f"{text}\n{key}: {tag}\n" if rng.random() < 0.3 else \
        "\n".join(f"{key}: {tag}" if line.startswith(f"{key}:") else line for line in text.splitlines()) + "\n"


def run_config_case(path: Path) -> Outcome:
    """Load `path` as `python -m chat --inf-llm-config-path PATH` does; a refusal also goes through the CLI."""
    from chat.cli import _load_config, main
    from inf_llm.config.schema import ConfigError, InfLLMConfig

    try:
        config, model_path, template = _load_config(str(path))
    except ConfigError as error:
        text = str(error)
        if len(text.splitlines()) != 1 or str(path) not in text:
            return Outcome("lost", f"ConfigError is not one line naming the file: {text!r}")
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                status = main(["--inf-llm-config-path", str(path), "--style", "simple"])
        except BaseException:
            return Outcome("lost", "the CLI raised:\n" + traceback.format_exc(limit=-4))
        lines = err.getvalue().splitlines()
        if status != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or str(path) not in lines[0]:
            return Outcome("lost", f"the CLI exited {status} with {err.getvalue()!r}")
        return Outcome("refused", text)
    except BaseException:
        return Outcome("lost", "raised:\n" + traceback.format_exc(limit=-4))
    if not isinstance(config, InfLLMConfig):
        return Outcome("lost", f"loaded {config!r}, not an InfLLMConfig")
    try:
        again = InfLLMConfig(**config.to_dict())
    except BaseException as error:
        return Outcome("lost", f"loaded an invalid config ({error})")
    if again != config or not all(v is None or isinstance(v, str) for v in (model_path, template)):
        return Outcome("lost", f"loaded {config} / {model_path!r} / {template!r}")
    return Outcome("recovered", f"{config.method}")


# --- the run ------------------------------------------------------------------------------------------------------


class Tally:
    def __init__(self, title: str):
        self.title, self.rows, self.examples = title, {}, {}

    def add(self, fault: str, outcome: Outcome, where: str) -> None:
        row = self.rows.setdefault(fault, [0, 0, 0, 0])
        row[0] += 1
        row[{"recovered": 1, "refused": 2, "lost": 3}[outcome.kind]] += 1
        if outcome.kind == "lost":
            print(f"LOST/WRONG: {where}\n  {outcome.detail}", flush=True)
        elif outcome.kind == "refused" and fault not in self.examples:
            self.examples[fault] = f"{where}\n    -> {outcome.detail}"

    def print(self, root: Path) -> None:
        print(f"\nexample refusals ({self.title}; temporary folder shown as ROOT):")
        for fault, text in self.examples.items():
            print(f"  {fault}: {text.replace(str(root), 'ROOT')[:600]}")
        header = ("fault class", "cases tried", "recovered", "refused cleanly", "lost/wrong")
        print(f"\n{self.title}\n| " + " | ".join(header) + " |")
        print("|---|---:|---:|---:|---:|")
        total = [0, 0, 0, 0]
        for fault, row in self.rows.items():
            print(f"| {fault} | " + " | ".join(str(n) for n in row) + " |")
            total = [a + b for a, b in zip(total, row)]
        print("| all | " + " | ".join(str(n) for n in total) + " |", flush=True)


def session_part(root: Path, cases: int, seed: int) -> Tally:
    from inf_llm.model.loading import load_model
    from tests.test_chat_conversation import VOCAB
    from tests.tiny_models import tiny_model

    os.environ[DATA_DIR_ENV] = str(root / "data")
    model, tokenizer = tiny_model("llama", vocab_size=VOCAB), load_model()[1]
    corpus = build_corpus(root, model, tokenizer)
    rng = random.Random(f"sessions-{seed}")
    tally = Tally(f"sessions: {cases} cases, seed {seed}")
    started = time.perf_counter()
    for index in range(cases):
        target = rng.choices(["A", "A2", "F"], weights=[5, 2, 2])[0]
        faults = [f for f in SESSION_FAULTS if target != "F" or f not in ("two files (or folders) swapped",)]
        fault = rng.choice(faults)
        read_only = rng.random() < 0.25
        what, outcome = run_session_case(corpus, target, SESSION_FAULTS[fault], rng, read_only)
        tally.add(fault, outcome, f"case {index} (session {target}{', read-only' if read_only else ''}): {what}")
    print(f"\n({cases} session cases in {time.perf_counter() - started:.0f} s)")
    tally.print(root)
    return tally


def config_part(root: Path, cases: int, seed: int) -> Tally:
    rng = random.Random(f"config-{seed}")
    seeds = config_seeds()
    folder = root / "configs"
    folder.mkdir()
    tally = Tally(f"config: {cases} cases, seed {seed}")
    started = time.perf_counter()
    for index in range(cases):
        name = rng.choice(sorted(seeds))
        what, content = mutate_config(rng, seeds[name])
        path = folder / f"case-{index}.yaml"
        (path.write_bytes if isinstance(content, bytes) else lambda t: path.write_text(t, encoding="utf-8"))(content)
        outcome = run_config_case(path)
        kind = what.split(":")[0].split(" ")[0] if not what.startswith("structure") else "structure"
        tally.add(CONFIG_CLASSES.get(kind, kind), outcome, f"case {index} ({name}): {what[:200]}")
        path.unlink()
    print(f"\n({cases} config cases in {time.perf_counter() - started:.0f} s)")
    tally.print(root)
    return tally


CONFIG_CLASSES = {"structure": "keys deleted, renamed or added; values of another type, huge, negative",
                  "random": "random byte changes", "duplicated": "a duplicated key", "cut": "cut at a random byte",
                  "invalid": "invalid YAML appended", "non-UTF-8": "non-UTF-8 bytes",
                  "empty": "an empty file (or only a comment)", "top": "a list or a scalar at the top level",
                  "a": "deeply nested values", "tag": "YAML tags and aliases"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=200, help="cases per part")
    parser.add_argument("--only", choices=PARTS, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # the chat's warnings (a cut index, ...) are not outcomes here
    print(f"python -m tests.fuzz_run --seed {args.seed} --cases {args.cases}"
          + (f" --only {args.only}" if args.only else ""))
    lost = 0
    with tempfile.TemporaryDirectory(prefix="inf-llm-fuzz-") as tmp:
        torch.manual_seed(args.seed)
        for part in PARTS:
            if args.only in (None, part):
                root = Path(tmp) / part
                root.mkdir()
                tally = (session_part if part == "sessions" else config_part)(root, args.cases, args.seed)
                lost += sum(row[3] for row in tally.rows.values())
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
