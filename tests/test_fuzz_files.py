"""Hostile and damaged files, a fixed subset of `python -m tests.fuzz_run`: each kind of damage to a saved session
and to a config file, with the outcome it must have.

Oracles: a session that resumes gives the next-token logits of the engine that saved the state it holds (atol=0),
and a turn and a save go through without changing anything outside its folder; a refused one gives one line
naming the session (or the file) and the problem, and nothing on disk changed (names, sizes, mtimes, bytes). A
config loads to a valid InfLLMConfig, or raises ConfigError of one line naming the file, which the chat's CLI
prints as one line before exiting with status 2.
"""

import os
import random
import shutil
import struct
import zipfile

import pytest
import torch

from inf_llm.sessions.digest import content_sha256
from inf_llm.sessions.names import DATA_DIR_ENV
from inf_llm.sessions.state_file import STATE_FILE
# model and tokenizer: a tiny random Llama with the embedded tokenizer (the conversation tests' fixtures).
from tests.test_chat_conversation import model  # noqa: F401
from tests import fuzz_run
from tests.fuzz_run import build_corpus, run_config_case, run_session_case


@pytest.fixture(scope="module")
def corpus(model, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DATA_DIR_ENV, str(root / "data"))
        yield build_corpus(root, model, tokenizer)


@pytest.fixture(autouse=True)
def data_dir(corpus, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(corpus.data_dir))


def damage(action):
    """A fault for run_session_case that does `action(folder, corpus)` and expects the target's own save."""
    def fault(rng, corpus, target):
        expect = action(corpus.session, corpus)
        return action.__name__, corpus.sha[target] if expect is None else expect
    return fault


def gen(folder):
    (g,) = [p for p in folder.iterdir() if p.name.startswith("g-")]
    return g


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def swap(a, b):
    tmp = a.with_name(a.name + ".swap")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


def forge(folder, change):
    payload = torch.load(folder / STATE_FILE, weights_only=True)
    change(payload)
    payload["sha256"] = content_sha256(payload)
    torch.save(payload, folder / STATE_FILE)


def state_truncated(folder, corpus):
    state = folder / STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])


def state_bit_flipped(folder, corpus):
    """A bit flipped in the middle of the pickled payload: never in the zip's alignment padding, which holds
    nothing (a fixed offset landed there once the saved config grew, and the session rightly resumed)."""
    state = folder / STATE_FILE
    with zipfile.ZipFile(state) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
    assert info.compress_type == zipfile.ZIP_STORED  # torch.save stores records uncompressed
    data = state.read_bytes()
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # the local file header's
    flip(state, info.header_offset + 30 + name_len + extra_len + info.file_size // 2)


def block_record_flipped(folder, corpus):
    flip(gen(folder) / "layer-001" / "blocks.data", 100)  # in block 0: found when the probe reads it


def unused_data_flipped(folder, corpus):
    flip(gen(folder) / "layer-000" / "blocks.data", 120_000)  # past every record: nothing names it


def index_truncated(folder, corpus):
    index = gen(folder) / "layer-001" / "blocks.index"
    index.write_bytes(index.read_bytes()[:-40])


def layer_folders_swapped(folder, corpus):
    swap(gen(folder) / "layer-000", gen(folder) / "layer-001")  # same layout, every CRC intact: only the digest


def repr_folders_swapped(folder, corpus):
    swap(gen(folder) / "layer-000-reprs", gen(folder) / "layer-001-reprs")


def data_files_swapped(folder, corpus):
    swap(gen(folder) / "layer-000" / "blocks.data", gen(folder) / "layer-001" / "blocks.data")


def layout_from_other_config(folder, corpus):
    shutil.copyfile(gen(corpus.folder("D")) / "layer-000" / "layout.json", gen(folder) / "layer-000" / "layout.json")


def index_from_other_session(folder, corpus):
    shutil.copyfile(gen(corpus.folder("B")) / "layer-001" / "blocks.index", gen(folder) / "layer-001" / "blocks.index")


def state_from_other_config(folder, corpus):
    shutil.copyfile(corpus.folder("D") / STATE_FILE, folder / STATE_FILE)


def earlier_state_of_the_same_session(folder, corpus):
    # A2 is A resumed and saved again in the same generation: A's state.pt opens A2's folder at A's save.
    shutil.copyfile(corpus.folder("A") / STATE_FILE, folder / STATE_FILE)
    return corpus.sha["A"]


def later_state_of_the_same_session(folder, corpus):
    shutil.copyfile(corpus.folder("A2") / STATE_FILE, folder / STATE_FILE)


def foreign(value):
    def state_is_foreign(folder, corpus):
        torch.save(value, folder / STATE_FILE)
    return state_is_foreign


def forged_identity(folder, corpus):
    forge(folder, lambda p: p.__setitem__("identity", 2.5))


def forged_version_tensor(folder, corpus):
    forge(folder, lambda p: p.__setitem__("version", torch.zeros(3)))


def forged_transcript(folder, corpus):
    forge(folder, lambda p: p.__setitem__("messages", 5))


def forged_saved_at(folder, corpus):
    forge(folder, lambda p: p.__setitem__("saved_at", "yesterday"))


def forged_tokens(folder, corpus):
    forge(folder, lambda p: p["engine"].__setitem__("tokens", torch.tensor(3)))


def forged_layer_state(folder, corpus):
    forge(folder, lambda p: p["engine"]["memory"]["layers"][1].pop("win_v"))


def forged_full_attention_layers(folder, corpus):
    forge(folder, lambda p: p["engine"]["memory"]["layers"].pop())


def forged_generation_outside(folder, corpus):
    name = gen(folder).name
    shutil.copytree(gen(folder), corpus.outside / name)
    forge(folder, lambda p: p["blocks"].__setitem__("generation", str(corpus.outside / name)))


def forged_generation_climbing(folder, corpus):
    name = gen(folder).name
    forge(folder, lambda p: p["blocks"].__setitem__("generation", f"../{fuzz_run.CASE}.session/{name}"))


def link_to_copy(rel):
    def symlinked_to_an_outside_copy(folder, corpus):
        path = folder / rel if rel == STATE_FILE else gen(folder) / rel.removeprefix("g-/")
        copy = corpus.outside / path.name
        shutil.move(path, copy)
        os.symlink(copy, path)
    symlinked_to_an_outside_copy.__name__ += f" ({rel})"
    return symlinked_to_an_outside_copy


def data_file_missing(folder, corpus):
    (gen(folder) / "layer-001-reprs" / "blocks.data").unlink()


def layout_missing(folder, corpus):
    (gen(folder) / "layer-001" / "layout.json").unlink()  # layer 0 opened first: its log must not be written


def index_emptied(folder, corpus):
    (gen(folder) / "layer-000" / "blocks.index").write_bytes(b"")


def extras(folder, corpus):
    os.mkfifo(gen(folder) / "layer-000" / "fifo")
    (folder / "notes.txt").write_text("mine")
    (folder / "g-leftover").mkdir()
    (folder / "g-leftover" / "blocks.data").write_bytes(b"x" * 64)
    target = corpus.outside / "keep"
    target.mkdir()
    (target / "keep.txt").write_text("must stay\n")
    os.symlink(target, folder / "g-link")  # named like a generation: a save must not remove what it points to


class NotOurs:
    pass


# (target session, damage, read-only, outcome)
SESSION_CASES = [
    ("A", state_truncated, False, "refused"),
    ("A", state_bit_flipped, False, "refused"),
    ("A", block_record_flipped, False, "refused"),  # resumes; the turn that reads the block stops
    ("A", block_record_flipped, True, "refused"),  # a read-only resume copies (and checks) every block
    ("A", unused_data_flipped, False, "recovered"),
    ("A", index_truncated, False, "refused"),
    ("A", layer_folders_swapped, False, "refused"),
    ("A", repr_folders_swapped, False, "refused"),
    ("A", data_files_swapped, False, "refused"),
    ("A", layout_from_other_config, False, "refused"),
    ("A", index_from_other_session, False, "refused"),
    ("A", state_from_other_config, False, "refused"),
    ("A2", earlier_state_of_the_same_session, False, "recovered"),
    ("A", later_state_of_the_same_session, False, "refused"),
    ("A", foreign({"weights": torch.zeros(3)}), False, "refused"),
    ("A", foreign(torch.arange(6)), False, "refused"),
    ("A", foreign([1, "two"]), False, "refused"),
    ("A", foreign(NotOurs()), False, "refused"),
    ("A", forged_identity, False, "refused"),
    ("A", forged_version_tensor, False, "refused"),
    ("A", forged_transcript, False, "refused"),
    ("A", forged_saved_at, False, "refused"),
    ("A", forged_tokens, False, "refused"),
    ("A", forged_layer_state, False, "refused"),
    ("F", forged_full_attention_layers, False, "refused"),
    ("A", forged_generation_outside, False, "refused"),
    ("A", forged_generation_climbing, False, "refused"),
    ("A", link_to_copy("state.pt"), False, "refused"),
    ("A", link_to_copy("g-/"), False, "refused"),
    ("A", link_to_copy("g-/layer-000-reprs"), False, "refused"),
    ("A", link_to_copy("g-/layer-000/blocks.data"), False, "refused"),
    ("A", link_to_copy("g-/layer-001/blocks.index"), True, "refused"),
    ("A", data_file_missing, False, "refused"),
    ("A", data_file_missing, True, "refused"),
    ("A", layout_missing, False, "refused"),
    ("A", index_emptied, False, "refused"),
    ("A", extras, False, "recovered"),
]


@pytest.mark.parametrize("target,action,read_only,want", SESSION_CASES,
                         ids=[f"{t}-{a.__name__}{'-ro' if ro else ''}" for t, a, ro, _ in SESSION_CASES])
def test_damaged_session(corpus, target, action, read_only, want):
    what, outcome = run_session_case(corpus, target, damage(action), random.Random(0), read_only)
    assert (outcome.kind, what) == (want, what), outcome.detail


def test_refusals_name_the_file(corpus):
    """The refusal names the file at fault, not only the session."""
    _, outcome = run_session_case(corpus, "A", damage(state_bit_flipped), random.Random(0), False)
    assert f"{corpus.session / STATE_FILE} is damaged" in outcome.detail
    _, outcome = run_session_case(corpus, "A", damage(layer_folders_swapped), random.Random(0), False)
    assert "blocks.index is not the index this session saved" in outcome.detail
    _, outcome = run_session_case(corpus, "A", damage(link_to_copy("g-/layer-000/blocks.data")), random.Random(0), False)
    assert "blocks.data is a symbolic link" in outcome.detail


def test_old_sessions_without_index_digests_still_resume(corpus):
    def no_digests(folder, corpus):
        forge(folder, lambda p: [layer.pop(k) for layer in p["blocks"]["layers"] for k in ("kv_index", "repr_index")])
    # Forged here, so its checksum is another; the resumed logits must still be A's.
    fault = damage(no_digests)
    what, outcome = run_session_case(corpus, "A", fault, random.Random(0), False)
    assert outcome.kind == "recovered", outcome.detail


def test_a_fuzz_run_of_each_fault_class_loses_nothing(corpus):
    rng = random.Random("test")
    for fault in fuzz_run.SESSION_FAULTS.values():
        what, outcome = run_session_case(corpus, "A", fault, rng, False)
        assert outcome.kind != "lost", f"{what}: {outcome.detail}"


# --- config files --------------------------------------------------------------------------------------------------

CONFIG_CASES = [
    # (text, outcome, words of the message)
    ("local_window: 1000000000000000000000000000000\n", "refused", ["local_window=", "at most 2147483647"]),
    ("block_size: -16\n", "refused", ["block_size=-16"]),
    ("topk_blocks: 16.0\n", "refused", ["topk_blocks=16.0", "integer"]),
    ("method: [inf-llm]\n", "refused", ["method=['inf-llm']"]),
    ("local_window: null\n", "refused", ["local_window=None"]),
    ("local_window: {a: 1}\n", "refused", ["local_window={'a': 1}"]),
    ("host_cache_bytes: 1000000000000\n", "recovered", []),
    ("local_window: [1\n", "refused", ["not valid YAML", "line 2"]),
    ("a:\n\tb: 1\n", "refused", ["not valid YAML", "'\\t'"]),
    ("local_window: " + "[" * 5000 + "]" * 5000 + "\n", "refused", ["nested too deeply"]),
    ("model:\n  type: [inf-llm]\n", "refused", ["model.type=['inf-llm']"]),
    ("model:\n  type: origin\nconv_type: {a: 1}\n", "refused", ["conv_type={'a': 1}"]),
    ("local_window: !!python/object:os.system {}\n", "refused", ["python/object"]),
    (b"local_window: \xff\n", "refused", ["utf-8"]),
    ("", "refused", ["mapping"]),
    ("- method: full\n", "refused", ["mapping", "list"]),
    ("42\n", "refused", ["mapping", "int"]),
    ("method: full\nmethod: full\n", "refused", ["duplicate key 'method'"]),
]


@pytest.mark.parametrize("text,want,words", CONFIG_CASES)
def test_damaged_config(tmp_path, text, want, words):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    outcome = run_config_case(path)  # a refusal is also run through the CLI: one line, status 2
    assert outcome.kind == want, outcome.detail
    for word in words:
        assert word in outcome.detail


def test_a_fuzz_run_of_each_preset_loses_nothing(tmp_path):
    rng = random.Random("test")
    seeds = fuzz_run.config_seeds()
    for i in range(60):
        name = sorted(seeds)[i % len(seeds)]
        what, content = fuzz_run.mutate_config(rng, seeds[name])
        path = tmp_path / f"c{i}.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        outcome = run_config_case(path)
        assert outcome.kind != "lost", f"{name}: {what}: {outcome.detail}"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced descriptors through /proc")
def test_a_session_tier_fsyncs_its_layout_when_synced(tmp_path, monkeypatch):
    """A session's tiers are written with durable=False and made durable by `sync` at each save: that must cover
    layout.json too, or power loss after the commit could leave a session whose layout is empty."""
    from inf_llm.storage.disk_tier import LAYOUT_FILE, DiskTier
    from inf_llm.storage.row_layout import RowLayout

    tier = DiskTier(tmp_path / "t", RowLayout(8, "float32"), durable=False)
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    tier.sync()
    assert str(tmp_path / "t" / LAYOUT_FILE) in synced
