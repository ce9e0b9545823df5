"""Tests of the benchmark package (inf_llm.bench): the passkey prompt, resumable result logs, the speed and gpu
commands at tiny sizes, the FLOP counts and the plots.

The commands run on a tiny random Llama that uses the embedded model's tokenizer (so the real passkey prompt and
chat template are exercised) or, for `gpu --tiny`, on a tiny random Mistral. Nothing here measures time: the
assertions are exact invariants (token counts, record fields, arithmetic of the derived numbers).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from matplotlib import image as mpimg
from transformers import LlamaConfig, LlamaForCausalLM

from inf_llm.bench import gpu as gpu_bench
from inf_llm.bench.__main__ import main, parse_length, parse_lengths
from inf_llm.bench.display import speed_rows
from inf_llm.bench.flops import attended_keys, decoder_params, kv_bytes_per_token, matmul_peak, prefill_flops
from inf_llm.bench.methods import method_runs, parse_overrides, variant_runs
from inf_llm.bench.prompt import FILLER, build_passkey_prompt, is_correct, needle_line
from inf_llm.bench.results import ResultLog, read_records
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.config.schema import InfLLMConfig

# Small windowed settings, so that a few hundred tokens exercise eviction, blocks and retrieval.
SMALL = ["--set", "num_sink_tokens=8", "--set", "local_window=64", "--set", "chunk_size=32", "--set", "block_size=16",
         "--set", "topk_blocks=2", "--set", "device_cache_blocks=4"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A random 2-layer Llama with the embedded tokenizer's vocabulary, saved as a checkpoint folder."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _png_size(path) -> tuple[int, int]:
    height, width = mpimg.imread(path).shape[:2]
    return width, height


# --- the passkey prompt -------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1000, 4096, 16384])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_prompt_length_and_depth(tokenizer, length, depth):
    prompt = build_passkey_prompt(tokenizer, length, depth, seed=3)
    ids = prompt.ids
    assert abs(len(ids) - length) <= 0.02 * length, (len(ids), length)

    # Token position: the key's digits (one token each in this tokenizer) first appear where the builder says
    # the needle is, and that is at the requested fraction of the whole prompt, up to the fixed text around
    # the context (instruction before, question after: under 100 tokens).
    digit_ids = [tokenizer.convert_tokens_to_ids(c) for c in prompt.key]
    first = next(i for i in range(len(ids)) if ids[i : i + 5] == digit_ids)
    assert prompt.needle_token <= first < prompt.needle_end
    assert abs(first / len(ids) - depth) <= 100 / len(ids) + 0.01
    assert abs(prompt.actual_depth - depth) <= 0.01
    assert tokenizer.decode(ids[prompt.needle_token : prompt.needle_end]).strip() == needle_line(prompt.key)

    # Text position: the share of filler sentences before the needle is the depth, to one sentence.
    text = tokenizer.decode(ids)
    head, tail = text.split(needle_line(prompt.key))
    pattern = "|".join(re.escape(s) for s in FILLER)
    before, after = len(re.findall(pattern, head)), len(re.findall(pattern, tail))
    assert abs(before / (before + after) - depth) <= 1 / (before + after) + 1e-9


def test_passkey_prompt_is_a_chat_turn_and_deterministic(tokenizer):
    prompt = build_passkey_prompt(tokenizer, 600, 0.5, seed=0)
    text = tokenizer.decode(prompt.ids)
    assert text.startswith("<|im_start|>system")
    assert text.endswith("What is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is")
    assert build_passkey_prompt(tokenizer, 600, 0.5, seed=0) == prompt
    keys = {build_passkey_prompt(tokenizer, 600, 0.5, seed=s).key for s in range(5)}
    assert len(keys) == 5 and all(re.fullmatch(r"\d{5}", k) for k in keys)
    raw = build_passkey_prompt(tokenizer, 600, 0.5, seed=0, chat_template=False)
    assert "<|im_start|>" not in tokenizer.decode(raw.ids) and raw.key == prompt.key


def test_passkey_prompt_refuses_bad_requests(tokenizer):
    with pytest.raises(ValueError, match="depth"):
        build_passkey_prompt(tokenizer, 1000, 1.5, seed=0)
    with pytest.raises(ValueError, match="too short"):
        build_passkey_prompt(tokenizer, 20, 0.5, seed=0)


def test_is_correct():
    assert is_correct("12345", " 12345.")
    assert is_correct("12345", "The key is 12345, remember")
    assert not is_correct("12345", " 1234 5")
    assert not is_correct("12345", "")


# --- settings of the methods --------------------------------------------------------------------------------


def test_overrides_and_method_identities():
    overrides = parse_overrides(["topk_blocks=4", "cache_policy=lru-s", "score_decay=0.5", "per_head_ranking=true"])
    assert overrides == {"topk_blocks": 4, "cache_policy": "lru-s", "score_decay": 0.5, "per_head_ranking": True}
    runs = {r.method: r for r in method_runs(InfLLMConfig(), ("inf-llm", "stream-llm", "full"), overrides, tag="t")}
    assert runs["inf-llm"].config.topk_blocks == 4 and runs["inf-llm"].label.startswith("inf-llm topk_blocks=4")
    # The baselines' identity and label ignore settings they do not use.
    assert runs["stream-llm"].label == "stream-llm (t)" and "topk_blocks" not in runs["stream-llm"].identity()
    assert runs["full"].identity() == {"method": "full"}
    with pytest.raises(ValueError, match="topk_block"):
        method_runs(InfLLMConfig(), ("inf-llm",), parse_overrides(["topk_block=4"]))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["topk_blocks"])
    assert parse_length("4K") == 4096 and parse_length("1M") == 1 << 20 and parse_lengths("8K,4096,4K") == (4096, 8192)
    # Where blocks are kept never changes a result: not part of the identity (finished cases are not re-run).
    placed = method_runs(InfLLMConfig(host_cache_bytes=1 << 20), ("inf-llm",), {})[0]
    assert placed.identity() == method_runs(InfLLMConfig(), ("inf-llm",), {})[0].identity()


def test_baselines_keep_a_short_conversations_window_and_sinks_only():
    """A base whose short_conversation places the sinks and the voted blocks in memory (as the embedded model's
    preset does): every baseline still runs beside inf-llm, with the short conversation's window and sinks; inf-llm
    keeps the whole mapping. The shipped preset is checked too (stream-llm refused it before)."""
    short = {"local_window": 256, "num_sink_tokens": 8, "sink_memory_distance": 64, "voted_memory_distance": 64}
    base = InfLLMConfig(rerank_blocks=128, prompt_end_blocks=4, short_conversation=short, short_conversation_until=1024)
    runs = {r.method: r for r in method_runs(base, ("inf-llm", "stream-llm", "infinite-lm", "full"), {})}
    assert runs["inf-llm"].config.short_conversation == short
    for method in ("stream-llm", "infinite-lm", "full"):
        config = runs[method].config
        assert config.short_conversation == {"local_window": 256, "num_sink_tokens": 8}
        assert config.short_conversation_until == 1024 and config.short_config().local_window == 256
    assert runs["stream-llm"].identity()["short_conversation"] == {"local_window": 256, "num_sink_tokens": 8}
    memory_only = base.replace(short_conversation={"sink_memory_distance": 64})
    (stream,) = method_runs(memory_only, ("stream-llm",), {})
    assert stream.config.short_conversation is None and stream.config.short_conversation_until is None
    preset = load_config(default_preset_for(None)).config
    assert [r.method for r in method_runs(preset, ("inf-llm", "stream-llm", "infinite-lm", "full"), {})] == [
        "inf-llm", "stream-llm", "infinite-lm", "full"]


def test_compare_adds_inf_llm_variants_to_the_same_run():
    base = InfLLMConfig()
    (variant,) = variant_runs(base, {"topk_blocks": 4}, ["storage_dtype=int8"])
    assert variant.method == "inf-llm" and variant.label == "inf-llm topk_blocks=4 storage_dtype=int8"
    assert variant.config.storage_dtype == "int8" and variant.config.topk_blocks == 4
    assert variant.identity() != method_runs(base, ("inf-llm",), {"topk_blocks": 4})[0].identity()
    (both,) = variant_runs(base, {}, ["storage_dtype=int8,repr_tokens=2"])
    assert (both.config.storage_dtype, both.config.repr_tokens) == ("int8", 2)
    with pytest.raises(ValueError, match="--set already sets"):
        variant_runs(base, {"storage_dtype": "float16"}, ["storage_dtype=int8"])


# --- result log ---------------------------------------------------------------------------------------------


def test_result_log_resumes_and_survives_a_cut_line(tmp_path):
    path = tmp_path / "r.jsonl"
    log = ResultLog(path)
    log.append("passkey", {"length": 10, "depth": 0.5}, correct=True)
    assert log.done("passkey", {"depth": 0.5, "length": 10}) and not log.done("speed", {"depth": 0.5, "length": 10})
    with path.open("a") as handle:
        handle.write('{"kind": "passkey", "case": {"len')  # a write cut short by a kill
    again = ResultLog(path)
    assert len(again.records) == 1 and again.done("passkey", {"length": 10, "depth": 0.5})
    again.append("passkey", {"length": 20, "depth": 0.5}, correct=False)
    assert [r["case"]["length"] for r in read_records(path)] == [10, 20]
    fresh = ResultLog(path, fresh=True)
    assert fresh.records == [] and len(read_records(tmp_path / "r.jsonl.bak")) == 2


def test_passkey_command_resumes_and_sweeps(tiny_checkpoint, tmp_path):
    base = ["passkey", "--model-path", str(tiny_checkpoint), "--lengths", "300,400", "--depths", "0.5",
            "--full-max-len", "300", "--out", str(tmp_path), *SMALL]
    assert main([*base, "--seeds", "1"]) == 0
    records = read_records(tmp_path / "passkey.jsonl")
    # 2 lengths for inf-llm and stream-llm, 1 length for full.
    assert sorted((r["label"].split()[0], r["case"]["length"]) for r in records) == sorted(
        [(m, n) for m in ("inf-llm", "stream-llm") for n in (300, 400)] + [("full", 300)])
    for r in records:
        assert abs(r["tokens"] - r["case"]["length"]) <= 0.03 * r["case"]["length"]
        assert r["correct"] == (r["key"] in r["answer"])
        # The memory read the whole prompt and every answer token but the last (which generate does not feed).
        assert r["answer_tokens"] in range(1, 9)
        assert r["memory"]["tokens"] == r["tokens"] + r["answer_tokens"] - 1
    assert main([*base, "--seeds", "1"]) == 0
    assert len(read_records(tmp_path / "passkey.jsonl")) == 5  # nothing re-run
    assert main([*base, "--seeds", "2"]) == 0
    assert [r["case"]["seed"] for r in read_records(tmp_path / "passkey.jsonl")[5:]] == [1] * 5  # only seed 1 added
    # A sweep of an inf-llm-only setting re-runs inf-llm only (the baselines' results cannot change).
    assert main([*base, "--seeds", "2", "--set", "repr_tokens=2"]) == 0
    added = read_records(tmp_path / "passkey.jsonl")[10:]
    assert len(added) == 4 and {r["label"] for r in added} == {"inf-llm " + " ".join(SMALL[1::2]) + " repr_tokens=2"}
    assert _png_size(tmp_path / "passkey.png") == (800, 500)


@pytest.mark.parametrize("method", ["inf-llm", "full"])
def test_passkey_shared_prefixes_give_the_results_of_fresh_reads(tiny_checkpoint, method):
    """A case that restores an earlier case's snapshot ends in the same memory as one read from empty."""
    from inf_llm.bench.passkey import Checkpoints, PasskeyCase, PasskeyPlan, run_case
    from inf_llm.generation.engine import Engine
    from inf_llm.model.loading import load_model

    model, tok = load_model(str(tiny_checkpoint))
    config = InfLLMConfig(method=method, num_sink_tokens=8, local_window=64, chunk_size=32, block_size=16,
                          topk_blocks=2, device_cache_blocks=4)
    (run,) = method_runs(config, (method,), {})
    plan = PasskeyPlan(lengths=(700,), depths=(0.1, 0.5, 0.9), seeds=2, full_max_len=700, prefill_chunk=128)
    shared = Engine(model, tok, config, prefill_chunk=128)
    checkpoints = Checkpoints(shared)
    reused = []
    for depth in plan.depths:
        for seed in range(plan.seeds):
            case = PasskeyCase(run, 700, depth, seed)
            got = run_case(shared, case, plan, checkpoints=checkpoints)
            fresh = Engine(model, tok, config, prefill_chunk=128)
            want = run_case(fresh, case, plan)
            # The device cache's contents and counters depend on the history of requests, not the memory's values.
            traffic = ("cache_hits", "cache_misses", "device_blocks")
            assert got["answer"] == want["answer"]
            assert {k: v for k, v in got["memory"].items() if k not in traffic} == \
                {k: v for k, v in want["memory"].items() if k not in traffic}
            # Same memory: the next token sees exactly the same attention.
            assert shared.tokens == fresh.tokens
            torch.testing.assert_close(shared.feed([7]), fresh.feed([7]), rtol=0, atol=0)
            reused.append(got["reused_tokens"])
            assert want["reused_tokens"] == 0
    # The second seed of a depth reuses the first one's prefix (the 10% needle lies in the first prefill chunk).
    assert reused[0] == reused[1] == 0 and 0 < reused[3] < reused[5]


def test_long_read_document_is_the_chat_message_with_needles_at_their_depths(tokenizer):
    from inf_llm.bench.million import build_document, needle_sentence, question_ids, question_text
    from inf_llm.bench.prose_tasks import INTRO, render

    doc = build_document(tokenizer, 3000, (0.2, 0.8), seed=1)
    assert len(doc.ids) == 3000
    assert [n.depth for n in doc.needles] == [0.2, 0.8] and len({n.word for n in doc.needles}) == 2
    for needle in doc.needles:
        assert tokenizer.decode(doc.ids[needle.start : needle.end]) == f"\n\n{needle_sentence(needle.word, needle.value)}"
        assert abs(needle.start / len(doc.ids) - needle.depth) < 0.1
    text = tokenizer.decode(doc.ids + question_ids(tokenizer, doc.needles[0].word))
    # The pieces join into exactly the chat rendering of one user message: instruction, prose, question.
    content = text[text.index(INTRO):text.rindex(question_text(doc.needles[0].word)) + len(question_text(doc.needles[0].word))]
    assert text == render(tokenizer, content)
    assert content.count("One of the special magic numbers for") == 2
    # Deterministic, and the seed changes the words, numbers and prose.
    assert build_document(tokenizer, 3000, (0.2, 0.8), seed=1) == doc
    assert build_document(tokenizer, 3000, (0.2, 0.8), seed=2).ids != doc.ids
    with pytest.raises(ValueError, match="too short"):
        build_document(tokenizer, 40, (0.5,))


def test_long_read_plot_rates_are_the_tokens_between_checkpoints_over_their_seconds():
    """The plot's prefill rate: each checkpoint's new tokens over its prefill seconds; a checkpoint recorded twice
    (a stopped read resumed before it) counts once."""
    from inf_llm.bench.plot import prefill_rates

    points = [{"tokens": 100, "seconds": 2.0}, {"tokens": 300, "seconds": 6.0}, {"tokens": 300, "seconds": 6.0},
              {"tokens": 350, "seconds": 11.0}]
    assert prefill_rates(points) == [(100, 50.0), (300, 50.0), (350, 10.0)]


def test_long_read_command_holds_the_ram_budget_asks_every_needle_and_resumes_the_same(tiny_checkpoint, tmp_path,
                                                                                       capsys):
    budget = 8192  # bytes of blocks in RAM, all layers: 2 tiny blocks per layer
    args = ["long-read", "--model-path", str(tiny_checkpoint), "--device-map", "cpu", "--lengths", "300,900",
            "--depths", "0.2,0.8", "--host-cache-bytes", str(budget), "--every", "256", "--prefill-chunk", "128",
            "--max-new-tokens", "6", "--out", str(tmp_path), *SMALL]
    assert main(args) == 0
    records = read_records(tmp_path / "long-read.jsonl")
    final = [r for r in records if r["kind"] == "long_read"]
    progress = [r for r in records if r["kind"] == "long_read_progress"]
    assert [r["case"]["length"] for r in final] == [300, 900]
    assert [p["tokens"] for p in progress if p["case"]["length"] == 900] == [256, 512, 768, 900]
    for r in final:
        assert r["tokens"] == r["case"]["length"]
        assert r["asked"] == 2 and [a["depth"] for a in r["answers"]] == [0.2, 0.8]
        for a in r["answers"]:
            assert a["correct"] == bool(re.search(rf"(?<!\d){a['value']}(?!\d)", a["reply"]))
        assert r["correct"] == sum(a["correct"] for a in r["answers"])
        # The session saved at the end, resumed into a new engine, answers exactly as the engine that read it.
        assert r["same_after_resume"] and r["resumed_replies"] == [a["reply"] for a in r["answers"]]
        assert r["resumed_from"] is None and len(r["save_s"]) == -(-r["tokens"] // 256)
    long = final[1]
    assert long["host_block_bytes"] <= budget and long["disk_blocks"] > 0  # the rest went to disk
    assert all(p["host_block_bytes"] <= budget for p in progress)
    assert long["case"]["settings"]["host_cache_bytes"] == budget
    assert not any((tmp_path / "long-read-sessions").iterdir())  # each session removed after its record
    assert _png_size(tmp_path / "long-read.png") == (800, 500)
    capsys.readouterr()
    assert main(["table", str(tmp_path / "long-read.jsonl"), "--markdown"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 300") or line.startswith("| 900")]
    assert [row.split(" | ")[2] for row in rows] == [f"{r['correct']}/2" for r in final]
    # Run again: every case is done, nothing is read.
    assert main(args) == 0
    assert len(read_records(tmp_path / "long-read.jsonl")) == len(records)


def test_a_kept_long_read_is_asked_again_under_other_second_stage_settings_without_reading_it(tiny_checkpoint,
                                                                                              tmp_path):
    """--keep-sessions keeps the read memory; a run under other settings that the memory does not depend on (the
    second stage, the RAM budget) resumes it, asks its questions and records them as its own case, with no reading
    (no progress record, no save). Its answers are what a fresh read under those settings gives (oracle: a run in
    another folder). A setting the memory depends on reads again."""
    base = ["long-read", "--model-path", str(tiny_checkpoint), "--device-map", "cpu", "--lengths", "600",
            "--depths", "0.5", "--every", "256", "--prefill-chunk", "128", "--max-new-tokens", "6", *SMALL,
            "--set", "rerank_blocks=4"]
    kept = tmp_path / "kept"
    assert main([*base, "--out", str(kept), "--keep-sessions"]) == 0
    other = ["--set", "rerank_keep_blocks=1", "--host-cache-bytes", "8192"]
    assert main([*base, *other, "--out", str(kept)]) == 0
    assert main([*base, *other, "--out", str(tmp_path / "fresh")]) == 0
    first, again = [r for r in read_records(kept / "long-read.jsonl") if r["kind"] == "long_read"]
    fresh, = [r for r in read_records(tmp_path / "fresh" / "long-read.jsonl") if r["kind"] == "long_read"]
    progress = [r for r in read_records(kept / "long-read.jsonl") if r["kind"] == "long_read_progress"]
    assert again["case"]["settings"]["rerank_keep_blocks"] == 1 and first["case"]["settings"]["rerank_keep_blocks"] == 0
    assert again["resumed_from"]["tokens"] == 600 and again["save_s"] == [] and again["prefill_s"] == first["prefill_s"]
    assert all(p["case"]["settings"]["rerank_keep_blocks"] == 0 for p in progress)
    assert [a["reply"] for a in again["answers"]] == [a["reply"] for a in fresh["answers"]]
    assert not any((kept / "long-read-sessions").iterdir())  # the second run did not keep it
    assert main([*base, "--set", "storage_dtype=float32", "--out", str(kept)]) == 0
    assert any(p["case"]["settings"]["storage_dtype"] == "float32" for p in read_records(kept / "long-read.jsonl")
               if p["kind"] == "long_read_progress")


def test_the_long_read_table_compares_each_document_with_the_shortest_read_under_its_settings():
    from inf_llm.bench.display import long_read_table

    def record(length: int, ms: float, second_stage: int) -> dict:
        return {"case": {"length": length, "depths": [0.5], "settings": {"rerank_keep_blocks": second_stage}},
                "tokens": length, "correct": 1, "asked": 1, "prefill_tokens_per_s": 100.0, "decode_ms_per_token": ms,
                "rss_peak_bytes": 2**30, "host_block_bytes": 0, "repr_bytes": 0, "disk_bytes": 0, "last_save_s": None,
                "resume_s": 1.0, "same_after_resume": True}

    table = long_read_table([record(4096, 100.0, 0), record(2**20, 300.0, 0), record(4096, 50.0, 1),
                             record(2**20, 300.0, 1)])
    ratio = table.columns.index("/ shortest")
    assert [row[ratio] for row in table.rows] == ["1.00", "3.00", "1.00", "6.00"]


def test_decode_profile_reads_once_then_resumes_and_decodes_the_same(tmp_path, capsys):
    """The first run reads the document into the session, a second resumes it: the same reply (greedy), the
    store's counters per step, and the profiler's table when asked; another document's session is refused."""
    from inf_llm.bench.decode_profile import main as profile_main

    args = ["--session", str(tmp_path / "s"), "--tokens", "1024", "--host-cache-bytes", "256K", "--decode", "3"]
    profile_main(args)
    first = capsys.readouterr().out
    profile_main([*args, "--set", "rerank_reads_disk=false", "--profile", "5"])
    second = capsys.readouterr().out
    assert "read 1,024 tokens" in first and "resumed 1,024 tokens" in second
    reply = [line for line in first.splitlines() if line.startswith("reply ")]
    assert len(reply) == 1 and reply == [line for line in second.splitlines() if line.startswith("reply ")]
    assert "disk_reads" in second and "Ordered by: internal time" in second
    # The decoding steps' own counters, apart from the question's: with every block resident after the first step
    # (1,024 tokens, a 256K budget holding them all once read), nothing more is read from disk.
    after = [line for line in second.splitlines() if line.startswith("per step after the first: ")]
    assert len(after) == 1 and after[0].endswith("disk_reads 0")
    from inf_llm.sessions.names import SessionError

    with pytest.raises(SessionError, match="long_read"):
        profile_main([*args, "--depth", "0.2"])


def test_a_stopped_long_read_resumes_from_its_checkpoint_and_answers_as_an_unstopped_one(tiny_checkpoint, tmp_path,
                                                                                         tokenizer):
    from inf_llm.bench.million import build_document, read_and_ask
    from inf_llm.model.loading import load_model

    model, tok = load_model(str(tiny_checkpoint))
    config = InfLLMConfig(num_sink_tokens=8, local_window=64, chunk_size=32, block_size=16, topk_blocks=2,
                          device_cache_blocks=4, host_cache_bytes=8192)
    doc = build_document(tok, 1000, (0.3,), seed=4)
    whole = read_and_ask(model, tok, config, doc, tmp_path / "whole", prefill_chunk=128, max_new_tokens=6, every=256)

    class Stop(Exception):
        pass

    def stop_after_two(fields):
        if fields["tokens"] == 512:
            raise Stop

    with pytest.raises(Stop):
        read_and_ask(model, tok, config, doc, tmp_path / "stopped", prefill_chunk=128, max_new_tokens=6, every=256,
                     on_progress=stop_after_two)
    resumed = read_and_ask(model, tok, config, doc, tmp_path / "stopped", prefill_chunk=128, max_new_tokens=6,
                           every=256)
    assert resumed["resumed_from"]["tokens"] == 512 and len(resumed["save_s"]) == 2
    assert [a["reply"] for a in resumed["answers"]] == [a["reply"] for a in whole["answers"]]
    assert resumed["prefill_s"] > 0
    # Another document's checkpoint is refused, and left as it was.
    from inf_llm.sessions.names import SessionError

    with pytest.raises(Stop):
        read_and_ask(model, tok, config, doc, tmp_path / "other", prefill_chunk=128, max_new_tokens=6, every=256,
                     on_progress=stop_after_two)
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "other").rglob("*"))
    with pytest.raises(SessionError, match="long_read"):
        read_and_ask(model, tok, config, build_document(tok, 1000, (0.3,), seed=5), tmp_path / "other",
                     prefill_chunk=128, max_new_tokens=6, every=256)
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "other").rglob("*")) == before


def test_the_long_read_needle_oracle_forces_exactly_the_needles_blocks_in_both_engines(tiny_checkpoint, tmp_path,
                                                                                       monkeypatch):
    from inf_llm.bench.million import build_document, needle_blocks, read_and_ask, run_long_read
    from inf_llm.memory.model_memory import InfLLMMemory
    from inf_llm.model.loading import load_model

    model, tok = load_model(str(tiny_checkpoint))
    config = InfLLMConfig(num_sink_tokens=8, local_window=64, chunk_size=32, block_size=16, topk_blocks=2,
                          device_cache_blocks=8, host_cache_bytes=8192)
    doc = build_document(tok, 1000, (0.3, 0.7), seed=4)
    blocks = needle_blocks(doc, config)
    # The blocks are those that hold a needle token, by the memory's layout: sinks first, then block_size each.
    holding = {(p - 8) // 16 for n in doc.needles for p in range(n.start, n.end)}
    assert blocks == sorted(holding) and len(blocks) >= 2
    forced = []
    real = InfLLMMemory.force_blocks
    monkeypatch.setattr(InfLLMMemory, "force_blocks", lambda self, ids, *a: (forced.append(ids), real(self, ids, *a)))
    plain = read_and_ask(model, tok, config, doc, tmp_path / "plain", prefill_chunk=128, max_new_tokens=6, every=512)
    assert forced == []
    oracle = read_and_ask(model, tok, config, doc, tmp_path / "oracle", prefill_chunk=128, max_new_tokens=6,
                          every=512, needle_oracle=True)
    assert forced == [blocks, blocks]  # the reading engine and the resumed one
    assert oracle["same_after_resume"] and plain["answers"] != oracle["answers"]
    # With the top-k covering every block, forcing chooses nothing more: the replies are those without it.
    wide = config.replace(topk_blocks=64, device_cache_blocks=128)
    assert ([a["reply"] for a in read_and_ask(model, tok, wide, doc, tmp_path / "w1", prefill_chunk=128,
                                              max_new_tokens=6, every=512)["answers"]]
            == [a["reply"] for a in read_and_ask(model, tok, wide, doc, tmp_path / "w2", prefill_chunk=128,
                                                 max_new_tokens=6, every=512, needle_oracle=True)["answers"]])
    # The command keeps the oracle's records apart from the plain ones.
    log = ResultLog(tmp_path / "log.jsonl")
    for oracle_on in (False, True, True):
        run_long_read(model, tok, "tiny", config, (600,), (0.5,), log, max_new_tokens=4, every=512,
                      needle_oracle=oracle_on, say=lambda text: None)
    records = [r for r in read_records(tmp_path / "log.jsonl") if r["kind"] == "long_read"]
    assert [r["case"].get("needle_oracle", False) for r in records] == [False, True]


# --- speed --------------------------------------------------------------------------------------------------


def _check_speed_record(r, model, decode_tokens):
    length = r["case"]["length"]
    config = InfLLMConfig(**r["config"])
    # The memory holds the prompt and every decoded token.
    assert r["memory"]["tokens"] == length + decode_tokens
    assert r["prefill_s"] > 0 and r["prefill_tokens_per_s"] == pytest.approx(length / r["prefill_s"])
    assert r["decode_ms_min"] <= r["decode_ms_median"] and r["decode_ms_min"] <= r["decode_ms_per_token"]
    assert r["rss_growth_per_token"] == pytest.approx(r["rss_growth_bytes"] / length)
    assert r["kv16_bytes_per_token"] == kv_bytes_per_token(model.config) == 2 * 2 * 2 * 16 * 2
    assert r["rss_peak_growth_bytes"] >= r["rss_growth_bytes"]
    assert r["flops"] == prefill_flops(model, config, length, r["case"]["prefill_chunk"])
    assert r["efficiency"] == pytest.approx(r["flops"]["total"] / r["prefill_s"] / (r["peak_gflops"] * 1e9))
    if config.method == "full":
        assert r["memory"]["device_bytes"] == (length + decode_tokens) * kv_bytes_per_token(model.config, 4)
    else:
        assert r["memory"]["window_tokens"] == config.local_window
    if config.method == "inf-llm":
        # Each decoded token asks every layer for its top-k blocks: hits + misses count exactly those requests.
        requested = decode_tokens * model.config.num_hidden_layers * min(config.topk_blocks, r["memory"]["blocks"])
        assert r["decode_cache_hits"] + r["decode_cache_misses"] == requested
        assert r["decode_scoring_ms"] > 0
    else:
        assert r["decode_cache_hits"] == r["decode_cache_misses"] == 0 and r["decode_scoring_ms"] is None


def test_speed_command_reports_every_field(tiny_checkpoint, tmp_path):
    from inf_llm.model.loading import load_model

    model, _ = load_model(tiny_checkpoint)
    args = ["speed", "--model-path", str(tiny_checkpoint), "--lengths", "200,300", "--decode-tokens", "3",
            "--in-process", "--peak-seconds", "0.05", "--prefill-chunk", "64", "--out", str(tmp_path), *SMALL]
    assert main(args) == 0
    records = read_records(tmp_path / "speed.jsonl")
    speed = [r for r in records if r["kind"] == "speed"]
    assert sorted((r["case"]["settings"]["method"], r["case"]["length"]) for r in speed) == sorted(
        (m, n) for m in ("inf-llm", "stream-llm", "full") for n in (200, 300))
    for r in speed:
        _check_speed_record(r, model, 3)
    peaks = [r for r in records if r["kind"] == "matmul_peak"]
    assert [p["case"]["when"] for p in peaks][0] == "start" and peaks[-1]["case"]["when"] == "end"
    assert len(peaks) == len(speed) + 1  # start, before every case but the first, end
    assert (peaks[0]["m"], peaks[0]["k"], peaks[0]["n"]) == (64, 64, 128) and peaks[0]["gflops"] > 0
    # Each record divides by the best peak measured so far in its run; the table by the best of the run.
    before = [p["gflops"] for p in peaks[:-1]]
    for i, r in enumerate(speed):
        assert r["peak_gflops"] == max(before[: i + 1]) and r["run"] == peaks[0]["case"]["run"]
    best = max(r["peak_gflops"] for r in speed)
    for row in speed_rows(speed):
        r = row["record"]
        assert row["efficiency"] == pytest.approx(r["flops"]["total"] / r["prefill_s"] / (best * 1e9))
    # The table's ratios pair each record with full attention at the same length and its own shorter length.
    full = {r["case"]["length"]: r for r in speed if r["case"]["settings"]["method"] == "full"}
    for row in speed_rows(speed):
        r = row["record"]
        base, n = full[r["case"]["length"]], r["case"]["length"]
        assert row["prefill_speedup_vs_full"] == pytest.approx(base["prefill_s"] / r["prefill_s"])
        assert row["decode_vs_full"] == pytest.approx(r["decode_ms_per_token"] / base["decode_ms_per_token"])
        shorter = [q for q in speed if q["label"] == r["label"] and q["case"]["length"] < n]
        expected = r["rss_growth_bytes"] / n if not shorter else \
            (r["rss_growth_bytes"] - shorter[0]["rss_growth_bytes"]) / (n - shorter[0]["case"]["length"])
        assert row["rss_marginal_per_token"] == pytest.approx(expected)
    assert main(args) == 0  # resumed: nothing left to measure, no new peak either
    assert len(read_records(tmp_path / "speed.jsonl")) == len(records)
    assert _png_size(tmp_path / "speed.png") == (800, 500)


def test_speed_case_in_a_fresh_process(tiny_checkpoint, tmp_path):
    from inf_llm.model.loading import load_model

    model, _ = load_model(tiny_checkpoint)
    args = ["speed", "--model-path", str(tiny_checkpoint), "--lengths", "200", "--decode-tokens", "2",
            "--methods", "inf-llm", "--peak-seconds", "0.05", "--prefill-chunk", "64", "--out", str(tmp_path), *SMALL]
    assert main(args) == 0
    (record,) = [r for r in read_records(tmp_path / "speed.jsonl") if r["kind"] == "speed"]
    assert record["case"]["isolated"] is True
    _check_speed_record(record, model, 2)


# --- FLOPs --------------------------------------------------------------------------------------------------


def _brute_attended(config: InfLLMConfig, length: int) -> int:
    total = 0
    for p in range(length):
        for j in range(p + 1):
            in_window = p - j < config.window_for(p + 1)
            total += in_window or (config.method == "full") or (j < config.num_sink_tokens)
    return total


@pytest.mark.parametrize("method,wide", [("full", {}), ("stream-llm", {}), ("infinite-lm", {}),
                                         ("stream-llm", dict(wide_window=24, wide_window_until=40))])
def test_attended_keys_match_a_brute_force_count(method, wide):
    config = InfLLMConfig(method=method, num_sink_tokens=5, local_window=16, chunk_size=8, **wide)
    for length in (1, 10, 16, 17, 100):
        assert attended_keys(config, length) == _brute_attended(config, length)


def test_inf_llm_retrieving_everything_attends_everything():
    # One-token blocks and top-k above the block count: every evicted key is retrieved, as in full attention.
    config = InfLLMConfig(num_sink_tokens=4, local_window=16, block_size=1, repr_tokens=1, topk_blocks=200,
                          chunk_size=8, device_cache_blocks=200)
    assert attended_keys(config, 150) == 150 * 151 // 2
    bounded = InfLLMConfig(num_sink_tokens=4, local_window=16, block_size=8, topk_blocks=2, chunk_size=8)
    # Past the window, each query attends at most window + sinks + top-k blocks + half a block.
    assert attended_keys(bounded, 1000) <= 1000 * (16 + 4 + 2 * 8 + 4)


def test_prefill_flops_count_the_linear_maps(tiny_checkpoint):
    from inf_llm.model.loading import load_model

    model, _ = load_model(tiny_checkpoint)
    h, i, layers, kv_dim = 64, 128, 2, 2 * 16
    assert decoder_params(model) == layers * (2 * h * h + 2 * h * kv_dim + 3 * h * i)
    flops = prefill_flops(model, InfLLMConfig(method="full"), 100, prefill_chunk=64)
    assert flops["linear"] == 2 * decoder_params(model) * 100
    assert flops["vocab"] == 2 * h * model.config.vocab_size * 2  # two model calls, last position each
    assert flops["attention"] == 4 * 16 * 4 * layers * (100 * 101 // 2)
    peak = matmul_peak(8, 16, 32, seconds=0.01)
    assert peak["gflops"] > 0 and peak["iters"] >= 1 and (peak["m"], peak["k"], peak["n"]) == (8, 16, 32)


# --- gpu ----------------------------------------------------------------------------------------------------


def test_gpu_script_tiny_on_cpu(tmp_path):
    # The budget counts from the process's start, here pytest's: a budget of a day keeps the test's statuses
    # independent of how long the suite ran before it.
    assert main(["gpu", "--tiny", "--lengths", "128,256,512", "--decode-tokens", "2", "--prefill-chunk", "64",
                 "--budget-s", "86400", "--out", str(tmp_path)]) == 0
    records = [r for r in read_records(tmp_path / "gpu.jsonl") if r["kind"] == "gpu"]
    assert [(r["label"], r["case"]["length"], r["status"]) for r in records] == [
        (m, n, "ok") for m in ("full", "inf-llm") for n in (128, 256, 512)]
    for method in ("full", "inf-llm"):
        rows = [r for r in records if r["label"] == method]
        # Decoded tokens stay in the memory; the next segment reads that many fewer prompt tokens.
        assert [r["memory"]["tokens"] for r in rows] == [130, 258, 514]
        assert all(a["prefill_s"] < b["prefill_s"] for a, b in zip(rows, rows[1:]))
        assert all(r["decode_ms_per_token"] > 0 and r["peak_gpu_bytes"] is None for r in rows)
    assert records[-1]["memory"]["blocks"] > 0  # inf-llm formed memory blocks
    assert _png_size(tmp_path / "gpu.png") == (800, 500)


def test_gpu_script_needs_neither_rich_nor_matplotlib(tmp_path):
    # The GPU machines have torch and transformers but not our terminal and plotting packages.
    code = ("import sys\n"
            "for name in ('rich', 'matplotlib', 'platformdirs'): sys.modules[name] = None\n"
            "from inf_llm.bench.__main__ import main\n"
            "sys.exit(main(['gpu', '--tiny', '--lengths', '128', '--decode-tokens', '1', '--out', "
            f"{str(tmp_path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "no plot: import of matplotlib halted" in done.stdout
    assert [r["status"] for r in read_records(tmp_path / "gpu.jsonl") if r["kind"] == "gpu"] == ["ok", "ok"]


def test_gpu_script_stops_at_its_time_budget(tmp_path):
    runs = method_runs(gpu_bench.TINY_INF_LLM, ("inf-llm", "full"), {})
    plan = gpu_bench.GpuPlan(lengths=(256, 512), budget_s=1.0, prefill_chunk=64, tiny=True,
                             started=time.time() - 1.0)  # the budget is already spent
    records = gpu_bench.run_gpu(runs, plan, ResultLog(tmp_path / "g.jsonl"), say=lambda text: None)
    assert [(r["label"], r["status"]) for r in records] == [("full", "stopped: time budget"),
                                                            ("inf-llm", "stopped: time budget")]


def test_gpu_script_records_an_error_and_goes_on(tmp_path, monkeypatch):
    real_read = gpu_bench._read

    def failing_read(engine, ids, progress, device):
        if engine.config.method == "full":
            raise RuntimeError("boom")
        return real_read(engine, ids, progress, device)

    monkeypatch.setattr(gpu_bench, "_read", failing_read)
    runs = method_runs(gpu_bench.TINY_INF_LLM, ("inf-llm", "full"), {})
    plan = gpu_bench.GpuPlan(lengths=(256, 512), decode_tokens=1, prefill_chunk=128, tiny=True,
                             started=time.time())  # the budget from now, not from pytest's start
    records = gpu_bench.run_gpu(runs, plan, ResultLog(tmp_path / "g.jsonl"), say=lambda text: None)
    assert [(r["label"], r["case"]["length"], r["status"]) for r in records] == [
        ("full", 256, "error: RuntimeError: boom"), ("inf-llm", 256, "ok"), ("inf-llm", 512, "ok")]
    assert "failing_read" in records[0]["traceback"]


def test_gpu_segment_estimates():
    assert gpu_bench.estimate_segment_s(None, 0, 100, quadratic=False) is None
    assert gpu_bench.estimate_segment_s((0, 100, 2.0), 100, 400, quadratic=False) == pytest.approx(6.0)
    # Quadratic: reading 100..400 costs (400^2 - 100^2) / 100^2 = 15 times reading 0..100.
    assert gpu_bench.estimate_segment_s((0, 100, 2.0), 100, 400, quadratic=True) == pytest.approx(30.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_script_refuses_without_cuda(tmp_path, capsys):
    assert main(["gpu", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_table_and_plot_commands_redraw_from_a_file(tmp_path, capsys):
    log = ResultLog(tmp_path / "p.jsonl")
    for length, depth, correct in ((1024, 0.1, True), (1024, 0.9, False), (2048, 0.1, False)):
        for label in ("inf-llm", "full"):
            log.append("passkey", {"model": "m", "settings": {"method": label}, "length": length, "depth": depth},
                       label=label, correct=correct or label == "full")
    assert main(["plot", str(tmp_path / "p.jsonl")]) == 0
    assert _png_size(tmp_path / "p.png") == (800, 500)
    capsys.readouterr()
    assert main(["table", str(tmp_path / "p.jsonl"), "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| method | depth | 1K | 2K |" in lines
    assert "| full | all | 2/2 | 1/1 |" in lines and "| inf-llm | all | 1/2 | 0/1 |" in lines
    assert "|  | 10% | 1/1 | 0/1 |" in lines and "|  | 90% | 0/1 |  |" in lines
    with pytest.raises(SystemExit):
        main(["table"])


def test_gpu_profile_script_tiny_on_cpu_applies_its_settings(capsys):
    from inf_llm.bench import gpu_profile

    gpu_profile.main(["--tiny", "--context", "300", "--chunks", "1", "--prefill-chunk", "64", "--decode", "2",
                      "--rows", "3", "--set", "block_ranking=bounds", "--set", "topk_blocks=3"])
    out = capsys.readouterr().out
    assert "'block_ranking': 'bounds'" in out and "'topk_blocks': 3," in out
    assert "== 1 prefill calls of 64 tokens" in out and "== 2 decode steps" in out
    gpu_profile.main(["--tiny", "--context", "100", "--chunks", "1", "--prefill-chunk", "32", "--decode", "1",
                      "--rows", "3", "--method", "full"])
    assert "'method': 'full'" in capsys.readouterr().out
