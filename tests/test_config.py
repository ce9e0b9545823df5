"""Tests of inf_llm/config/: validation (schema.py), strict YAML loading (files.py), the reference format (reference.py),
presets (presets.py).

Every refusal asserts that its message names the offending field or key and its value, because the
message is all a user sees. The reference configs below reproduce thunlp/InfLLM's shipped files.
"""

import dataclasses
import logging
import textwrap

import pytest
import yaml

from inf_llm.config.files import load_config
from inf_llm.config.presets import (EMBEDDED_MODEL_PRESET, PRESET_DIR, available_presets, default_preset_for, preset_path)
from inf_llm.config.reference import REFERENCE_CONV_TEMPLATES, REFERENCE_KEYS
from inf_llm.config.schema import ConfigError, InfLLMConfig, LoadedConfig

FIELDS = [f.name for f in dataclasses.fields(InfLLMConfig)]


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def assert_names(message, *parts):
    for part in parts:
        assert str(part) in message, f"{part!r} missing from: {message}"


# --- InfLLMConfig validation --------------------------------------------------------------------

REFUSED = [
    # (changes, words the message must contain)
    (dict(method="sparse"), ["method", "'sparse'", "inf-llm"]),
    (dict(method="origin"), ["method", "'origin'"]),
    (dict(num_sink_tokens=-1), ["num_sink_tokens", "-1", ">= 0"]),
    (dict(local_window=0), ["local_window", "0", ">= 1"]),
    (dict(block_size=0), ["block_size", "0"]),
    (dict(repr_tokens=0), ["repr_tokens", "0"]),
    (dict(topk_blocks=0), ["topk_blocks", "0", ">= 1"]),
    (dict(chunk_size=-4), ["chunk_size", "-4"]),
    (dict(device_cache_blocks=0), ["device_cache_blocks", "0"]),
    (dict(local_window=256.0), ["local_window", "256.0", "integer"]),
    (dict(topk_blocks=True), ["topk_blocks", "True", "integer"]),
    (dict(block_size="64"), ["block_size", "'64'"]),
    (dict(cache_policy="lfu"), ["cache_policy", "'lfu'", "'lru-s'", "'fifo'"]),
    (dict(storage_dtype="int4"), ["storage_dtype", "'int4'", "'bfloat16'", "'int8'"]),
    (dict(kernel_backend="cuda"), ["kernel_backend", "'cuda'", "'triton'"]),
    (dict(per_head_ranking="yes"), ["per_head_ranking", "'yes'"]),
    (dict(block_ranking="quest"), ["block_ranking", "'quest'", "'bounds'"]),
    (dict(memory_positions="sorted"), ["memory_positions", "'sorted'", "'ordered'"]),
    (dict(memory_distance=0), ["memory_distance=0", ">= 1"]),
    (dict(memory_distance=1.5e3), ["memory_distance=1500.0", "integer"]),
    (dict(memory_positions="ordered", memory_positions_until=0), ["memory_positions_until=0", ">= 1"]),
    (dict(memory_positions_until=8192), ["memory_positions_until=8192", "memory_positions: shared"]),
    (dict(local_window=128, decode_memory_distance=64), ["decode_memory_distance=64", ">= 128"]),
    (dict(decode_memory_distance_from=1024), ["decode_memory_distance_from=1024", "decode_memory_distance",
                                               "not set"]),
    (dict(decode_memory_distance=512, decode_memory_distance_from=0), ["decode_memory_distance_from=0", ">= 1"]),
    (dict(decode_memory_distance_steps=8), ["decode_memory_distance_steps=8", "decode_memory_distance", "not set"]),
    (dict(decode_memory_distance=512, decode_memory_distance_steps=0), ["decode_memory_distance_steps=0", ">= 1"]),
    (dict(local_window=128, reply_start_distance=127), ["reply_start_distance=127", ">= 128"]),
    (dict(decode_memory_positions="sorted"), ["decode_memory_positions", "'sorted'", "'runs'"]),
    (dict(sink_memory_distance=0), ["sink_memory_distance=0", ">= 1"]),
    (dict(local_window=128, sink_memory_distance=200), ["sink_memory_distance=200", "global distance 128"]),
    (dict(local_window=128, memory_distance=512, decode_memory_distance=256, sink_memory_distance=300),
     ["sink_memory_distance=300", "global distance 256"]),
    (dict(memory_positions="ordered", sink_memory_distance=64), ["sink_memory_distance=64", "shared"]),
    (dict(decode_memory_positions="runs", sink_memory_distance=64), ["sink_memory_distance=64", "shared"]),
    (dict(method="stream-llm", sink_memory_distance=64), ["sink_memory_distance=64", "true positions"]),
    (dict(voted_memory_distance=64), ["voted_memory_distance=64", "no vote", "prompt_end_blocks"]),
    (dict(voted_memory_places=0), ["voted_memory_places=0", ">= 1"]),
    (dict(rerank_blocks=128, prompt_end_blocks=4, voted_memory_places=2), ["voted_memory_places=2",
                                                                           "voted_memory_distance"]),
    (dict(rerank_blocks=128, prompt_end_blocks=4, voted_memory_distance=64, voted_memory_places=5),
     ["voted_memory_places=5", "prompt_end_blocks=4"]),
    (dict(rerank_blocks=128, prompt_end_blocks=4, voted_memory_distance=64, voted_memory_consensus=0),
     ["voted_memory_consensus=0", "above 0"]),
    (dict(rerank_blocks=128, prompt_end_blocks=4, voted_memory_distance=64, voted_memory_consensus=1.5),
     ["voted_memory_consensus=1.5", "at most prompt_end_run=1"]),
    (dict(rerank_blocks=128, prompt_end_blocks=4, voted_memory_distance=64, voted_memory_consensus=True),
     ["voted_memory_consensus=True", "a number"]),
    (dict(rerank_blocks=128, prompt_end_blocks=4, voted_memory_consensus=0.5), ["voted_memory_consensus=0.5",
                                                                              "voted_memory_distance"]),
    (dict(rerank_blocks=128, prompt_end_blocks=4, voted_memory_distance=64, sink_memory_with_voted=True),
     ["sink_memory_with_voted", "sink_memory_distance"]),
    (dict(sink_memory_distance=64, sink_memory_with_voted=True), ["sink_memory_with_voted", "voted_memory_distance"]),
    (dict(sink_memory_with_voted="yes"), ["sink_memory_with_voted", "'yes'", "true or false"]),
    (dict(wide_window=64, wide_window_until=100), ["wide_window=64", ">= 128"]),
    (dict(wide_window=512), ["wide_window=512", "wide_window_until"]),
    (dict(wide_window_until=8192), ["wide_window_until=8192", "without wide_window"]),
    (dict(wide_window=512, wide_window_until=0), ["wide_window_until=0", ">= 1"]),
    (dict(decode_memory_bias=-0.5), ["decode_memory_bias=-0.5", ">= 0"]),
    (dict(decode_memory_bias="high"), ["decode_memory_bias='high'", ">= 0"]),
    (dict(decode_memory_bias=float("nan")), ["decode_memory_bias=nan", ">= 0"]),
    (dict(rank_rotated=1), ["rank_rotated", "1", "true or false"]),
    (dict(rank_distance=-1), ["rank_distance=-1", ">= 0"]),
    (dict(rank_distance=True), ["rank_distance=True", "integer"]),
    (dict(rank_distance=64, rank_rotated=False), ["rank_distance=64", "rank_rotated is false"]),
    (dict(following_blocks=-1), ["following_blocks", "-1", ">= 0"]),
    (dict(prefill_topk_blocks=0), ["prefill_topk_blocks", "0", ">= 1"]),
    (dict(prefill_topk_blocks=True), ["prefill_topk_blocks", "True", "integer"]),
    (dict(prefill_topk_blocks=129), ["prefill_topk_blocks=129", "device_cache_blocks=128"]),
    (dict(prefill_topk_blocks=16, topk_blocks=129, device_cache_blocks=128), ["topk_blocks=129", "device_cache_blocks=128"]),
    (dict(following_blocks=2), ["following_blocks=2", "192 blocks", "device_cache_blocks=128"]),
    (dict(following_blocks=1, per_head_ranking=True, device_cache_blocks=128), ["following_blocks=1", "per_head_ranking"]),
    (dict(rerank_blocks=0), ["rerank_blocks", "0", ">= 1"]),
    (dict(rerank_blocks=32), ["rerank_blocks=32", "64 blocks", "top-k"]),
    (dict(rerank_blocks=48, topk_blocks=16, prefill_topk_blocks=64), ["rerank_blocks=48", "64 blocks"]),
    (dict(rerank_blocks=256), ["rerank_blocks=256", "device_cache_blocks=128"]),
    (dict(rerank_blocks=128, per_head_ranking=True), ["rerank_blocks=128", "per_head_ranking"]),
    (dict(rerank_chunks=False), ["rerank_chunks=false", "rerank_blocks"]),
    (dict(rerank_keep_blocks=8), ["rerank_keep_blocks=8", "rerank_blocks"]),
    (dict(rerank_blocks=128, rerank_keep_blocks=65), ["rerank_keep_blocks=65", "topk_blocks=64"]),
    (dict(rerank_blocks=128, rerank_keep_blocks=-1), ["rerank_keep_blocks=-1", ">= 0"]),
    (dict(rerank_reads_disk=False), ["rerank_reads_disk=false", "rerank_blocks"]),
    (dict(rerank_blocks=128, rerank_reads_disk=0), ["rerank_reads_disk=0", "true or false"]),
    (dict(rerank_blocks=128, device_cache_blocks=128, rerank_chunks="no"), ["rerank_chunks='no'", "true or false"]),
    (dict(shared_blocks=4), ["shared_blocks=4", "rerank_blocks"]),
    (dict(rerank_blocks=128, shared_blocks=-1), ["shared_blocks=-1", ">= 0"]),
    (dict(rerank_blocks=128, topk_blocks=64, shared_blocks=65), ["topk_blocks=64 with shared_blocks=65 (129 blocks)", "device_cache_blocks=128"]),
    (dict(shared_candidates=4), ["shared_candidates=4", "rerank_blocks"]),
    (dict(rerank_blocks=64, shared_candidates=-1), ["shared_candidates=-1", ">= 0"]),
    (dict(rerank_blocks=120, shared_candidates=16), ["rerank_blocks=120 with shared_candidates=16 (136 blocks)", "device_cache_blocks=128"]),
    (dict(rerank_blocks=64, shared_blocks=2, shared_decay=1.5), ["shared_decay=1.5", "from 0 to 1"]),
    (dict(rerank_blocks=64, shared_blocks=2, shared_decay="half"), ["shared_decay='half'", "from 0 to 1"]),
    (dict(rerank_blocks=64, shared_decay=0.5), ["shared_decay=0.5", "nothing is shared"]),
    (dict(shared_votes="all"), ["shared_votes='all'", "picks", "exact"]),
    (dict(rerank_blocks=64, shared_votes="exact"), ["shared_votes='exact'", "nothing is shared"]),
    (dict(prompt_end_blocks=8), ["prompt_end_blocks=8", "rerank_blocks"]),
    (dict(rerank_blocks=64, prompt_end_blocks=-1), ["prompt_end_blocks=-1", ">= 0"]),
    (dict(rerank_blocks=64, prompt_end_blocks=True), ["prompt_end_blocks=True", "integer"]),
    (dict(rerank_blocks=128, topk_blocks=64, shared_blocks=8, prompt_end_blocks=57),
     ["topk_blocks=64 with shared_blocks=8 and prompt_end_blocks=57 (129 blocks)", "device_cache_blocks=128"]),
    (dict(rerank_blocks=64, prompt_end_queries=32), ["prompt_end_queries=32", "set prompt_end_blocks"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, prompt_end_queries=0), ["prompt_end_queries=0", ">= 1"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, prompt_end_queries=True), ["prompt_end_queries=True", "integer"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, chunk_size=64, prompt_end_queries=65),
     ["prompt_end_queries=65", "chunk_size=64"]),
    (dict(rerank_blocks=64, prompt_end_following=1), ["prompt_end_following=1", "set prompt_end_blocks"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, prompt_end_following=-1), ["prompt_end_following=-1", ">= 0"]),
    (dict(rerank_blocks=120, topk_blocks=64, prompt_end_blocks=40, prompt_end_following=1),
     ["topk_blocks=64 with prompt_end_blocks=40 and prompt_end_following=1 (144 blocks)", "device_cache_blocks=128"]),
    (dict(rerank_blocks=64, prompt_end_rounds=2), ["prompt_end_rounds=2", "set prompt_end_blocks"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, prompt_end_rounds=0), ["prompt_end_rounds=0", ">= 1"]),
    (dict(rerank_blocks=120, topk_blocks=64, prompt_end_blocks=24, prompt_end_following=1, prompt_end_rounds=2),
     ["topk_blocks=64 with prompt_end_blocks=24 and prompt_end_following=1 and prompt_end_rounds=2 (160 blocks)",
      "device_cache_blocks=128"]),
    (dict(rerank_blocks=64, prompt_end_tally="rank"), ["prompt_end_tally='rank'", "set prompt_end_blocks"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, prompt_end_tally="borda"), ["prompt_end_tally", "borda", "count"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, prompt_end_skip=5), ["prompt_end_skip=5", "set prompt_end_queries"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, prompt_end_queries=32, prompt_end_skip=-1),
     ["prompt_end_skip=-1", ">= 0"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, chunk_size=64, prompt_end_queries=60, prompt_end_skip=5),
     ["prompt_end_queries=60 and prompt_end_skip=5", "chunk_size=64"]),
    (dict(rerank_blocks=64, prompt_end_run=2), ["prompt_end_run=2", "set prompt_end_blocks"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, prompt_end_run=0), ["prompt_end_run=0", ">= 1"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, prompt_end_run=2, prompt_end_following=1),
     ["prompt_end_run=2 and prompt_end_following=1", "choose one"]),
    (dict(rerank_blocks=64, prompt_end_blocks=2, prompt_end_run=3), ["prompt_end_run=3", "prompt_end_blocks=2"]),
    (dict(rerank_blocks=64, prompt_end_shortlist=1024), ["prompt_end_shortlist=1024", "set prompt_end_blocks"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, prompt_end_shortlist=4), ["prompt_end_shortlist=4", ">= 8"]),
    (dict(rerank_blocks=64, prompt_end_rise="positive"), ["prompt_end_rise='positive'", "set prompt_end_blocks"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, prompt_end_rise="mean"), ["prompt_end_rise", "mean", "positive"]),
    (dict(rerank_blocks=64, prompt_end_baseline="own"), ["prompt_end_baseline='own'", "set prompt_end_blocks"]),
    (dict(rerank_blocks=64, prompt_end_recent=8), ["prompt_end_recent=8", "set prompt_end_blocks"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, prompt_end_recent=-1), ["prompt_end_recent=-1", ">= 0"]),
    (dict(topk_blocks=8, device_cache_blocks=30, rerank_blocks=30, prompt_end_blocks=16, prompt_end_recent=8),
     ["prompt_end_recent=8", "exceeds device_cache_blocks=30"]),
    (dict(rerank_blocks=64, prompt_end_blocks=8, prompt_end_baseline="none"), ["prompt_end_baseline", "none", "own"]),
    (dict(reply_pool_blocks=0), ["reply_pool_blocks=0", ">= 1"]),
    (dict(reply_pool_blocks=32), ["reply_pool_blocks=32", "64 blocks", "raise reply_pool_blocks"]),
    (dict(rerank_blocks=128, reply_pool_blocks=100), ["reply_pool_blocks=100", "128 blocks"]),
    (dict(reply_pool_blocks=128, per_head_ranking=True), ["reply_pool_blocks=128", "per_head_ranking"]),
    (dict(reply_pool_blocks=True), ["reply_pool_blocks=True", "integer"]),
    (dict(reply_pool_blocks=128, reply_pool_every=0), ["reply_pool_every=0", ">= 1"]),
    (dict(decode_rank_every=0), ["decode_rank_every=0", ">= 1"]),
    (dict(decode_rank_every=True), ["decode_rank_every=True", "integer"]),
    (dict(topk_blocks=160), ["topk_blocks=160", "device_cache_blocks=128"]),
    (dict(topk_blocks=8, device_cache_blocks=4), ["topk_blocks=8", "device_cache_blocks=4"]),
    (dict(repr_tokens=33, block_size=32), ["repr_tokens=33", "block_size=32"]),
    (dict(chunk_size=512), ["chunk_size=512", "local_window=128"]),
    (dict(method="stream-llm", chunk_size=512), ["chunk_size=512", "local_window=128"]),
    (dict(cache_policy="lru-s"), ["score_decay", "None", "lru-s"]),
    (dict(score_decay=0.5), ["score_decay=0.5", "'lru'", "lru-s"]),
    (dict(cache_policy="fifo", score_decay=0.5), ["score_decay=0.5", "'fifo'"]),
    (dict(cache_policy="lru-s", score_decay=0.0), ["score_decay=0.0", "(0, 1)"]),
    (dict(cache_policy="lru-s", score_decay=1), ["score_decay=1", "(0, 1)"]),
    (dict(cache_policy="lru-s", score_decay=1.5), ["score_decay=1.5", "(0, 1)"]),
    (dict(cache_policy="lru-s", score_decay=-0.1), ["score_decay=-0.1", "(0, 1)"]),
    (dict(cache_policy="lru-s", score_decay="0.5"), ["score_decay", "'0.5'"]),
    (dict(method="full", block_size=0), ["block_size", "0"]),
    (dict(method="full", cache_policy="lru-s"), ["score_decay", "lru-s"]),
]


@pytest.mark.parametrize("changes,words", REFUSED, ids=[str(c) for c, _ in REFUSED])
def test_invalid_settings_are_refused_naming_field_and_value(changes, words):
    with pytest.raises(ValueError) as error:
        InfLLMConfig(**changes)
    assert_names(str(error.value), *words)


def test_defaults_are_the_embedded_model_settings_but_its_second_stage():
    config = InfLLMConfig()
    assert (config.method, config.num_sink_tokens, config.local_window, config.block_size) == (
        "inf-llm", 32, 128, 16)
    assert (config.repr_tokens, config.topk_blocks, config.chunk_size, config.device_cache_blocks) == (4, 64, 128, 128)
    assert (config.block_ranking, config.rank_rotated, config.following_blocks) == ("bounds", True, 0)
    assert (config.cache_policy, config.score_decay, config.per_head_ranking) == ("lru", None, False)
    assert (config.storage_dtype, config.kernel_backend) == ("auto", "auto")


def test_boundary_values_are_accepted():
    # Each equality is the largest value its invariant allows.
    InfLLMConfig(topk_blocks=32, device_cache_blocks=32, repr_tokens=64, block_size=64, chunk_size=256, local_window=256)
    InfLLMConfig(num_sink_tokens=0)
    InfLLMConfig(rerank_blocks=64)
    InfLLMConfig(rerank_blocks=128)
    InfLLMConfig(rerank_blocks=128, rerank_chunks=False)
    InfLLMConfig(rerank_blocks=128, rerank_keep_blocks=64)
    InfLLMConfig(rerank_blocks=128, reply_pool_blocks=128, reply_pool_every=1)
    InfLLMConfig(cache_policy="lru-s", score_decay=0.1)
    InfLLMConfig(cache_policy="fifo")
    # The baselines retrieve nothing: zero blocks is meaningful, and the memory invariants do not bind.
    InfLLMConfig(method="stream-llm", topk_blocks=0)
    InfLLMConfig(method="infinite-lm", topk_blocks=0, device_cache_blocks=1, repr_tokens=128)
    # Full attention has no window: chunk_size is only the prefill chunk.
    InfLLMConfig(method="full", chunk_size=4096, local_window=16, topk_blocks=99)


def test_config_is_frozen_and_score_decay_is_stored_as_float():
    config = InfLLMConfig(cache_policy="lru-s", score_decay=1 / 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.local_window = 8
    assert InfLLMConfig(cache_policy="lru-s", score_decay=0.25).score_decay == 0.25
    assert isinstance(config.score_decay, float)


def test_docstring_maps_every_field_to_its_reference_name():
    doc_rows = {line.split()[0]: line.split()[1] for line in InfLLMConfig.__doc__.splitlines()
                if line.split() and line.split()[0] in FIELDS}
    assert set(doc_rows) == set(FIELDS)
    for key, ref in REFERENCE_KEYS.items():
        if ref.to in FIELDS:
            assert doc_rows[ref.to] == key.removeprefix("model."), (ref.to, key)


def test_to_dict_lists_fields_in_order():
    config = InfLLMConfig(method="stream-llm", local_window=512)
    data = config.to_dict()
    assert list(data) == FIELDS
    assert data["method"] == "stream-llm" and data["local_window"] == 512
    assert InfLLMConfig(**data) == config


def test_replace_is_validated_and_leaves_the_original_unchanged():
    config = InfLLMConfig()
    changed = config.replace(topk_blocks=16, local_window=1024)
    assert (changed.topk_blocks, changed.local_window, config.topk_blocks) == (16, 1024, 64)
    with pytest.raises(ValueError) as error:
        config.replace(topk_blocks=256)
    assert_names(str(error.value), "topk_blocks=256", "device_cache_blocks=128")
    with pytest.raises(ValueError) as error:
        config.replace(local_windw=512)
    assert_names(str(error.value), "'local_windw'", "did you mean 'local_window'")


# --- our YAML format ------------------------------------------------------------------------------

ROUND_TRIP = [
    InfLLMConfig(),
    InfLLMConfig(method="stream-llm", num_sink_tokens=0, local_window=1024, topk_blocks=0),
    InfLLMConfig(cache_policy="lru-s", score_decay=0.1, per_head_ranking=True, storage_dtype="bfloat16",
                 kernel_backend="triton", block_size=32, repr_tokens=32, chunk_size=128),
    InfLLMConfig(method="full", cache_policy="fifo"),
]


@pytest.mark.parametrize("config", ROUND_TRIP, ids=[c.method for c in ROUND_TRIP])
@pytest.mark.parametrize("header", [None, "a preset\nfor testing"])
def test_to_yaml_then_load_config_round_trips(tmp_path, config, header):
    path = tmp_path / "c.yaml"
    config.to_yaml(path, header=header)
    assert load_config(path) == LoadedConfig(config)
    if header:
        assert path.read_text().startswith("# a preset\n# for testing\n")


def test_a_partial_file_takes_the_defaults_and_extras(tmp_path):
    path = write(tmp_path, """
        local_window: 512
        model_path: some/model
        conv_template: vicuna_v1.1
    """)
    assert load_config(path) == LoadedConfig(InfLLMConfig(local_window=512), (), "some/model", "vicuna_v1.1")


@pytest.mark.parametrize("text,words", [
    ("local_windw: 512\n", ["'local_windw'", "did you mean 'local_window'"]),
    ("n_local: 512\n", ["'n_local'", "reference", "'local_window'"]),
    ("exc_block_size: 128\n", ["'exc_block_size'", "'chunk_size'"]),
    ("zzz: 1\n", ["'zzz'", "valid keys", "num_sink_tokens"]),
    ("local_window: 512\nlocal_window: 1024\n", ["duplicate key", "local_window"]),
    ("topk_blocks: 256\n", ["topk_blocks=256", "device_cache_blocks=128"]),
    ("cache_policy: lru-s\n", ["score_decay", "lru-s"]),
    ("model_path: 3\n", ["model_path=3"]),
    ("conv_template: [a]\n", ["conv_template=['a']"]),
    ("local_window: [1\n", ["not valid YAML"]),
    ("- local_window\n", ["mapping", "list"]),
    ("inf-llm\n", ["mapping", "str"]),
    ("", ["mapping", "NoneType"]),
    ("model: inf-llm\n", ["'model'"]),
])
def test_bad_files_are_refused_naming_path_and_key(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert_names(str(error.value), str(path), *words)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "nowhere.yaml")
    assert_names(str(error.value), str(tmp_path / "nowhere.yaml"), "no such config file")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --- presets --------------------------------------------------------------------------------------

EXPECTED_PRESETS = {
    "smollm2-inf-llm", "smollm2-stream-llm", "smollm2-full", "mistral-7b-instruct-inf-llm",
    "llama-3-8b-instruct-inf-llm", "qwen2.5-7b-instruct-inf-llm", "mistral-7b-instruct-stream-llm",
    "mistral-7b-instruct-full",
}


def test_expected_presets_exist():
    assert EXPECTED_PRESETS <= set(available_presets())


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_loads_and_is_a_complete_serialised_instance(name):
    path = preset_path(name)
    loaded = load_config(path)
    assert loaded.notes == ()
    text = path.read_text()
    assert text.startswith("# "), "a preset starts with a comment saying what it is for"
    data = yaml.safe_load(text)
    assert [key for key in data if key in FIELDS] == FIELDS, "every field, in declaration order"
    assert loaded.config.method in name


def test_embedded_presets():
    # The dataclass defaults are its first stage; the preset adds the second (BENCHMARKS.md, prose).
    assert load_config(preset_path("smollm2-inf-llm")).config == InfLLMConfig(
        rerank_blocks=512, device_cache_blocks=512, rerank_chunks=False, rerank_keep_blocks=56, shared_blocks=8,
        prompt_end_blocks=16, prompt_end_queries=27, prompt_end_tally="rank", prompt_end_skip=5, prompt_end_run=2,
        reply_pool_blocks=8192, reply_pool_every=8, short_conversation_until=12288, short_conversation={
            "local_window": 512, "num_sink_tokens": 64, "sink_memory_distance": 128, "voted_memory_distance": 128,
            "voted_memory_consensus": 0.9, "sink_memory_with_voted": True})
    for name in ("smollm2-stream-llm", "smollm2-full"):
        loaded = load_config(preset_path(name))
        assert loaded.config.num_sink_tokens == 32 and loaded.config.local_window == 128
        assert loaded.model_path is None


@pytest.mark.parametrize("name,model_path", [
    ("mistral-7b-instruct-inf-llm", "mistralai/Mistral-7B-Instruct-v0.2"),
    ("llama-3-8b-instruct-inf-llm", "meta-llama/Meta-Llama-3-8B-Instruct"),
    ("qwen2.5-7b-instruct-inf-llm", "Qwen/Qwen2.5-7B-Instruct"),
])
def test_paper_presets(name, model_path):
    loaded = load_config(preset_path(name))
    assert loaded.config == InfLLMConfig(num_sink_tokens=128, local_window=4096, block_size=128, repr_tokens=4,
                                         topk_blocks=16, chunk_size=512, device_cache_blocks=32,
                                         block_ranking="representatives", rank_rotated=False)
    assert loaded.model_path == model_path


def test_preset_conv_templates_exist_in_fastchat():
    from fastchat.conversation import conv_templates

    for name in available_presets():
        template = load_config(preset_path(name)).conv_template
        assert template is None or template in conv_templates, (name, template)


def test_preset_path_accepts_suffix_and_refuses_unknown_names():
    assert preset_path("smollm2-full.yaml") == preset_path("smollm2-full") == PRESET_DIR / "smollm2-full.yaml"
    with pytest.raises(ConfigError) as error:
        preset_path("smollm2-ful")
    assert_names(str(error.value), "'smollm2-ful'", "did you mean 'smollm2-full'")
    with pytest.raises(ConfigError):
        preset_path("../config/smollm2-full")


def test_default_preset_for(caplog):
    assert default_preset_for(None) == preset_path(EMBEDDED_MODEL_PRESET) == preset_path("smollm2-inf-llm")
    assert default_preset_for("mistral") == preset_path("mistral-7b-instruct-inf-llm")
    assert default_preset_for("qwen2") == preset_path("qwen2.5-7b-instruct-inf-llm")
    assert default_preset_for("llama") == preset_path("llama-3-8b-instruct-inf-llm")
    with caplog.at_level(logging.INFO, logger="inf_llm.config"):
        assert default_preset_for("gpt_neox") == preset_path(EMBEDDED_MODEL_PRESET)
    assert "gpt_neox" in caplog.text


# --- the reference InfLLM format ------------------------------------------------------------------
# Reproductions of thunlp/InfLLM config/*.yaml.

MISTRAL_INF_LLM = """
model:
  type: inf-llm
  path: mistralai/Mistral-7B-Instruct-v0.2
  block_size: 128
  n_init: 128
  n_local: 4096
  topk: 16
  repr_topk: 4
  max_cached_block: 32
  exc_block_size: 512
  fattn: false
  base: 1000000
  distance_scale: 1.0

max_len: 2147483647
chunk_size: 8192
conv_type: mistral-inst
"""

LLAMA_3_INF_LLM = """
model:
  type: inf-llm
  path: meta-llama/Meta-Llama-3-8B-Instruct
  block_size: 128
  fattn: false
  n_init: 128
  n_local: 4096
  topk: 16
  repr_topk: 4
  max_cached_block: 32
  exc_block_size: 512
  base: 500000
  distance_scale: 1.0

max_len: 2147483647
chunk_size: 8192
conv_type: llama-3-inst
"""

MISTRAL_STREAM_LLM = """
model:
  type: stream-llm
  path: mistralai/Mistral-7B-Instruct-v0.2
  n_init: 128
  n_local: 6144
  fattn: true
  base: 1000000
  distance_scale: 1.0

max_len: 2147483647
chunk_size: 8192
conv_type: mistral-inst
"""

MISTRAL_INFINITE_LM = MISTRAL_STREAM_LLM.replace("type: stream-llm", "type: infinite-lm")

MISTRAL_ORIGIN = """
model:
  type: origin
  path: mistralai/Mistral-7B-Instruct-v0.2
  base: 1000000
  distance_scale: 1.0
  fattn: true

max_len: 32768
chunk_size: 8192
conv_type: mistral-inst
truncation: suffix
"""

# Shipped with topk above max_cached_block: the reference crashes on it when retrieving.
MISTRAL_INF_LLM_12K = """
model:
  type: inf-llm
  path: mistralai/Mistral-7B-Instruct-v0.2
  block_size: 128
  n_init: 128
  n_local: 4096
  topk: 64
  repr_topk: 4
  max_cached_block: 32
  exc_block_size: 512
  score_decay: 0.1
  fattn: true
  base: 1000000
  distance_scale: 1.0

max_len: 2147483647
chunk_size: 8192
conv_type: mistral-inst
"""

QWEN_INF_LLM = MISTRAL_INF_LLM_12K.replace("topk: 64", "topk: 16").replace(
    "mistralai/Mistral-7B-Instruct-v0.2", "Qwen/Qwen1.5-7B-Chat").replace("mistral-inst", "qwen")

PAPER = InfLLMConfig(num_sink_tokens=128, local_window=4096, block_size=128, repr_tokens=4, topk_blocks=16,
                     chunk_size=512, device_cache_blocks=32, block_ranking="representatives", rank_rotated=False)


def noted_keys(loaded):
    return {note.split("=")[0] for note in loaded.notes}


def test_reference_mistral_inf_llm(tmp_path):
    loaded = load_config(write(tmp_path, MISTRAL_INF_LLM))
    assert loaded.config == PAPER
    assert (loaded.model_path, loaded.conv_template) == ("mistralai/Mistral-7B-Instruct-v0.2", "mistral")
    # distance_scale 1.0 is what we do anyway, so it is honoured, not noted.
    assert noted_keys(loaded) == {"model.fattn", "model.base", "max_len", "chunk_size"}
    assert any("model.base=1000000" in note for note in loaded.notes)


def test_reference_llama_3_inf_llm(tmp_path):
    loaded = load_config(write(tmp_path, LLAMA_3_INF_LLM))
    assert loaded.config == PAPER
    assert (loaded.model_path, loaded.conv_template) == ("meta-llama/Meta-Llama-3-8B-Instruct", None)
    assert noted_keys(loaded) == {"model.fattn", "model.base", "max_len", "chunk_size", "conv_type"}
    assert any("'llama-3-inst'" in note and "tokenizer" in note for note in loaded.notes)


@pytest.mark.parametrize("text,method", [(MISTRAL_STREAM_LLM, "stream-llm"), (MISTRAL_INFINITE_LM, "infinite-lm")])
def test_reference_baselines(tmp_path, text, method):
    loaded = load_config(write(tmp_path, text))
    assert loaded.config.method == method
    assert (loaded.config.num_sink_tokens, loaded.config.local_window) == (128, 6144)
    assert loaded.config.chunk_size == InfLLMConfig().chunk_size
    assert noted_keys(loaded) == {"model.fattn", "model.base", "max_len", "chunk_size"}


def test_reference_origin_is_full_attention(tmp_path):
    loaded = load_config(write(tmp_path, MISTRAL_ORIGIN))
    assert loaded.config.method == "full"
    assert loaded.conv_template == "mistral"
    assert noted_keys(loaded) == {"model.fattn", "model.base", "max_len", "chunk_size", "truncation"}
    assert any("truncation='suffix'" in note for note in loaded.notes)


def test_reference_12k_config_is_refused_naming_both_keys(tmp_path):
    path = write(tmp_path, MISTRAL_INF_LLM_12K)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert_names(str(error.value), str(path), "topk_blocks=64", "device_cache_blocks=32",
                 "model.topk", "model.max_cached_block")


def test_reference_score_decay_without_lru_s_is_noted_not_applied(tmp_path):
    loaded = load_config(write(tmp_path, QWEN_INF_LLM))
    assert loaded.config == PAPER
    assert "model.score_decay" in noted_keys(loaded)
    assert loaded.conv_template is None


def test_reference_lru_s_and_perhead_are_honoured(tmp_path):
    text = MISTRAL_INF_LLM_12K.replace("topk: 64", "topk: 16\n  cache_strategy: lru-s\n  perhead: true")
    loaded = load_config(write(tmp_path, text))
    assert loaded.config == PAPER.replace(cache_policy="lru-s", score_decay=0.1, per_head_ranking=True)
    assert "model.score_decay" not in noted_keys(loaded)


def test_reference_repr_topk_defaults_to_the_reference_default(tmp_path):
    loaded = load_config(write(tmp_path, MISTRAL_INF_LLM.replace("  repr_topk: 4\n", "")))
    assert loaded.config.repr_tokens == 1


def test_reference_vicuna_conv_type(tmp_path):
    loaded = load_config(write(tmp_path, MISTRAL_INF_LLM.replace("mistral-inst", "vicuna")))
    assert loaded.conv_template == "vicuna_v1.1"


def test_reference_conv_templates_exist_in_fastchat():
    from fastchat.conversation import conv_templates

    for conv_type, template in REFERENCE_CONV_TEMPLATES.items():
        assert template is None or template in conv_templates, conv_type


def test_reference_unhonoured_keys_are_noted_by_name(tmp_path):
    extra = ("  async_global_stream: true\n  pin_memory: true\n  use_buffer: true\n  max_calc_block: 64\n"
             "  tokenizer_path: x\n  faiss: false\n  dense_decoding: false\n  exc_block_size: 512\n")
    text = MISTRAL_INF_LLM.replace("  exc_block_size: 512\n", extra) + (
        "datasets: [passkey]\noutput_dir_path: out\nrank: 0\nworld_size: 1\nverbose: true\n")
    loaded = load_config(write(tmp_path, text))
    assert loaded.config == PAPER
    assert noted_keys(loaded) == {
        "model.fattn", "model.base", "max_len", "chunk_size", "model.async_global_stream", "model.pin_memory",
        "model.use_buffer", "model.max_calc_block", "model.tokenizer_path", "datasets", "output_dir_path",
        "rank", "world_size", "verbose"}


@pytest.mark.parametrize("old,new,words", [
    ("  fattn: false\n", "  faiss: true\n", ["model.faiss=True", "faiss"]),
    ("  fattn: false\n", "  dense_decoding: true\n", ["model.dense_decoding=True"]),
    ("  fattn: false\n", "  chunk_topk_calc: 4\n", ["model.chunk_topk_calc=4"]),
    ("  fattn: false\n", "  rope_scaling: {type: linear, factor: 2.0}\n", ["model.rope_scaling", "RoPE"]),
    ("  fattn: false\n", "  ntk: true\n", ["model.ntk=True", "RoPE"]),
    ("  fattn: false\n", "  model_center: true\n", ["model.model_center=True"]),
    ("distance_scale: 1.0", "distance_scale: 0.25", ["model.distance_scale=0.25", "interpolation"]),
    ("  fattn: false\n", "  n_locall: 1\n", ["'model.n_locall'", "did you mean 'model.n_local'"]),
    ("max_len:", "max_length:", ["'max_length'", "did you mean 'max_len'"]),
    ("type: inf-llm", "type: h2o", ["model.type='h2o'", "'origin'"]),
    ("conv_type: mistral-inst", "conv_type: alpaca", ["conv_type='alpaca'", "'mistral-inst'"]),
    ("  topk: 16\n", "", ["model.topk", "'inf-llm'"]),
    ("  max_cached_block: 32\n", "", ["model.max_cached_block"]),
    ("n_init: 128", "n_init: -1", ["num_sink_tokens=-1", "model.n_init"]),
    ("n_local: 4096", "n_local: 256", ["chunk_size=512", "local_window=256", "model.exc_block_size",
                                      "model.n_local"]),
    ("repr_topk: 4", "repr_topk: 200", ["repr_tokens=200", "model.repr_topk", "model.block_size"]),
    ("  fattn: false\n", "  cache_strategy: lru-s\n", ["score_decay", "model.score_decay", "lru-s"]),
    ("path: mistralai/Mistral-7B-Instruct-v0.2", "path: 7", ["model.path=7"]),
])
def test_reference_refusals_name_the_key_and_value(tmp_path, old, new, words):
    assert old in MISTRAL_INF_LLM
    path = write(tmp_path, MISTRAL_INF_LLM.replace(old, new))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert_names(str(error.value), str(path), *words)


def test_reference_table_targets_are_real():
    for key, ref in REFERENCE_KEYS.items():
        assert ref.to in (None, *FIELDS, "model_path", "conv_template"), key
        assert (ref.to is None) == bool(ref.why), key
        assert not ref.refuse or ref.to is None, key
