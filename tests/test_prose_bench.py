"""Tests of the long-document benchmark: the prose corpus, the needle prompts, scoring, and the `prose` command.

Prompts use the embedded model's tokenizer and chat template (the user's path); the command runs a tiny random
Llama on a small corpus archive made here in the layout of the real one. Assertions are exact invariants: token
ranges decode to the needles, the prompt is the chat's rendering of one user message, scores count whole numbers.
"""

from __future__ import annotations

import io
import random
import tarfile

import pytest
import torch
from transformers import AutoConfig

from inf_llm.bench.__main__ import main
from inf_llm.bench.corpus import CORPUS_MEMBERS, CorpusMissing, clean_paragraphs, corpus_path, load_paragraphs
from inf_llm.bench.prose_tasks import MAX_NEW_TOKENS, TASKS, build_prose_prompt, score
from inf_llm.bench.results import read_records
# The benchmark tests' tiny Llama with the embedded tokenizer, and their small windowed settings.
from tests.test_bench import SMALL, tiny_checkpoint  # noqa: F401

_WORDS = ("the quiet river ran past old mills and small farms while people watched from low stone bridges "
          "and talked about weather harvests roads letters songs and the long winter ahead").split()


def _paragraph(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 6)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 16))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def paragraphs() -> tuple[str, ...]:
    rng = random.Random(0)
    return tuple(_paragraph(rng) for _ in range(300))


def _wrapped(paragraphs, width=60) -> str:
    """Hard-wrapped text in the style of the corpus files, with a heading and licence boilerplate."""
    import textwrap

    parts = ["The Project Gutenberg Etext of a test", "CHAPTER I", "Contents, Names, Places"]
    parts += [textwrap.fill(p, width) for p in paragraphs]
    return "\n\n".join(parts) + "\n\nEnd of the Project Gutenberg Etext of a test, which is long enough to be dropped.\n"


def _archive(path, texts) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for member, text in zip(CORPUS_MEMBERS, texts):
            data = text.encode("latin-1")
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


# --- the corpus ---------------------------------------------------------------------------------------------------


def test_clean_paragraphs_reflows_and_drops_boilerplate_and_headings(paragraphs):
    text = _wrapped(paragraphs[:5]).replace("the quiet", "`the quiet'", 1)
    cleaned = clean_paragraphs(text)
    assert cleaned == [p.replace("the quiet", "'the quiet'", 1) if i == 0 and "the quiet" in p else p
                       for i, p in enumerate(paragraphs[:5])]


def test_corpus_archive_is_read_in_place_and_errors_name_the_fetch_command(tmp_path, paragraphs, monkeypatch):
    path = tmp_path / "corpus.tar.gz"
    _archive(path, [_wrapped(paragraphs[:10]), _wrapped(paragraphs[10:20])])
    assert load_paragraphs(path) == paragraphs[:20]  # the first text, then the second
    monkeypatch.setenv("INF_LLM_CORPUS", str(path))
    assert corpus_path() == path and load_paragraphs() == paragraphs[:20]
    with pytest.raises(CorpusMissing, match="make corpus"):
        load_paragraphs(tmp_path / "missing.tar.gz")
    (tmp_path / "bad.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(CorpusMissing, match="pip download --no-deps --no-binary :all: brotli==1.2.1"):
        load_paragraphs(tmp_path / "bad.tar.gz")


def test_the_installed_corpus_is_natural_prose():
    """`make setup` fetched the archive: both texts are there, cleaned into paragraphs of prose."""
    prose = load_paragraphs()
    text = " ".join(prose)
    assert len(prose) > 800 and len(text) > 400_000
    assert "Alice was beginning to get very tired" in prose[0]
    assert "Workshop on Electronic Texts" in text
    assert not any("gutenberg" in p.lower() for p in prose)


# --- prompts and scoring --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length,depth", [(1024, 0.0), (2048, 0.5), (4096, 0.9)])
def test_prose_prompt_places_every_needle_and_asks_as_a_chat_user(tokenizer, paragraphs, task, length, depth):
    from chat.chat_format import ChatFormat

    prompt = build_prose_prompt(tokenizer, task, length, depth, seed=3, paragraphs=paragraphs)
    assert abs(len(prompt.ids) - length) <= 32
    # The token ranges hold the needle sentences, in the document, the target at its depth.
    start, end = prompt.context
    for (a, b), text in zip(prompt.needles, prompt.needle_texts):
        assert start <= a < b <= end and tokenizer.decode(prompt.ids[a:b]).strip() == text
    target = prompt.needles[prompt.target][0]
    assert abs((target - start) / (end - start) - depth) < 0.05
    # Every expected number is in a needle; distractors (multikey) hold other numbers.
    assert all(any(answer in text for text in prompt.needle_texts) for answer in prompt.answers)
    assert len(prompt.needles) == {"single": 1, "twohop": 2}.get(task, 4)
    # Exactly what the chat sends for one user message: the tokenizer's template, the generation prompt, no prefix.
    text = tokenizer.decode(prompt.ids)
    assert text.endswith(f"{prompt.question}<|im_end|>\n<|im_start|>assistant\n")
    message = text[text.index("Some special magic numbers"): text.index(prompt.question) + len(prompt.question)]
    assert prompt.ids == ChatFormat.create(tokenizer).render([{"role": "user", "content": message}],
                                                             add_generation_prompt=True)
    assert build_prose_prompt(tokenizer, task, length, depth, seed=3, paragraphs=paragraphs) == prompt
    assert build_prose_prompt(tokenizer, task, length, depth, seed=4, paragraphs=paragraphs).answers != prompt.answers


def test_prose_prompt_refuses_bad_requests(tokenizer, paragraphs):
    with pytest.raises(ValueError, match="depth"):
        build_prose_prompt(tokenizer, "single", 2048, 1.5, 0, paragraphs=paragraphs)
    with pytest.raises(ValueError, match="too short"):
        build_prose_prompt(tokenizer, "single", 100, 0.5, 0, paragraphs=paragraphs)
    with pytest.raises(ValueError, match="unknown task"):
        build_prose_prompt(tokenizer, "summary", 2048, 0.5, 0, paragraphs=paragraphs)


def test_score_counts_whole_numbers_only():
    assert score(("1234567",), "The number is 1234567.") == 1.0
    assert score(("1234567",), "The number is 91234567 or 12345678.") == 0.0
    assert score(("1234567",), "It is 12345.") == 0.0
    assert score(("1111111", "2222222", "3333333", "4444444"), "1111111, 3333333 and 5555555") == 0.5


# --- the command ------------------------------------------------------------------------------------------------------


def test_prose_command_answers_every_case_resumes_and_draws(tiny_checkpoint, tokenizer, tmp_path, paragraphs,
                                                            monkeypatch):
    corpus = tmp_path / "corpus.tar.gz"
    _archive(corpus, [_wrapped(paragraphs[:150]), _wrapped(paragraphs[150:])])
    monkeypatch.setenv("INF_LLM_CORPUS", str(corpus))
    torch.set_num_threads(1)
    base = ["prose", "--model-path", str(tiny_checkpoint), "--tasks", "single,twohop", "--lengths", "600,700",
            "--depths", "0.5", "--seeds", "1", "--full-max-len", "600", "--out", str(tmp_path), *SMALL]
    assert main(base) == 0
    records = read_records(tmp_path / "prose.jsonl")
    eos = {tokenizer.eos_token_id, AutoConfig.from_pretrained(tiny_checkpoint).eos_token_id}
    # 2 tasks x (2 lengths for inf-llm and stream-llm + 1 for full).
    assert len(records) == 10
    for r in records:
        assert abs(r["tokens"] - r["case"]["length"]) <= 32
        assert r["score"] == score(tuple(r["answers"]), r["reply"]) and r["correct"] == (r["score"] == 1.0)
        # Greedy until EOS or the task's token budget: every token counted, the budget never exceeded.
        budget = MAX_NEW_TOKENS[r["case"]["task"]]
        assert r["reply_tokens"] == len(r["reply_ids"]) and 1 <= r["reply_tokens"] <= budget
        assert r["reply_tokens"] == budget or r["reply_ids"][-1] in eos
    assert main(base) == 0 and len(read_records(tmp_path / "prose.jsonl")) == 10  # nothing re-run
    # --min-new-tokens: cases of their own (the key and the label say so), no reply ending before its N tokens.
    assert main([*base, "--methods", "inf-llm", "--lengths", "600", "--min-new-tokens", "2"]) == 0
    records = read_records(tmp_path / "prose.jsonl")
    least = [r for r in records if r["case"]["prompt"].get("min_new_tokens") == 2]
    assert len(records) == 12 and len(least) == 2 and all(r["label"].endswith(" min 2") for r in least)
    assert all(r["reply_tokens"] >= 2 and not eos & set(r["reply_ids"][:2]) for r in least)
    assert main(["table", str(tmp_path / "prose.jsonl"), "--markdown"]) == 0
    assert (tmp_path / "prose.png").stat().st_size > 0
    monkeypatch.setenv("INF_LLM_CORPUS", str(tmp_path / "missing.tar.gz"))
    assert main(base) == 2  # a clear error, before the model loads


def test_needle_oracle_cases_are_their_own_and_force_the_answers_blocks(tiny_checkpoint, tokenizer, tmp_path,
                                                                       paragraphs, monkeypatch, capsys):
    """--needle-oracle: inf-llm's cases carry the oracle in their key and label (a resumed run keeps them apart
    from plain ones); the forced blocks are exactly those holding a token of the needle with the answer."""
    from inf_llm.bench.prose import answer_blocks

    corpus = tmp_path / "corpus.tar.gz"
    _archive(corpus, [_wrapped(paragraphs[:150]), _wrapped(paragraphs[150:])])
    monkeypatch.setenv("INF_LLM_CORPUS", str(corpus))
    torch.set_num_threads(1)
    base = ["prose", "--model-path", str(tiny_checkpoint), "--tasks", "multikey", "--lengths", "700", "--depths",
            "0.5", "--seeds", "1", "--methods", "inf-llm,stream-llm", "--out", str(tmp_path),
            *[arg.replace("device_cache_blocks=4", "device_cache_blocks=8") for arg in SMALL]]
    # Whether the oracle's blocks are forced when inf-llm starts reading a case's prompt, and when it replies.
    from inf_llm.generation.engine import Engine

    forced_at = []
    reset, feed, generate = Engine.reset, Engine.feed, Engine.generate

    def note(engine, when: str) -> None:
        if engine.config.method == "inf-llm" and (when != "read" or not forced_at or forced_at[-1][0] == "reset"):
            layer = engine.memory.layers[0]
            forced_at.append((when, layer.forced_blocks is not None and layer.forced_from))

    def resetting(engine, *args, **kwargs):
        note(engine, "reset")
        return reset(engine, *args, **kwargs)

    def feeding(engine, *args, **kwargs):
        note(engine, "read")
        return feed(engine, *args, **kwargs)

    def generating(engine, *args, **kwargs):
        note(engine, "reply")
        return generate(engine, *args, **kwargs)
    monkeypatch.setattr(Engine, "reset", resetting)
    monkeypatch.setattr(Engine, "feed", feeding)
    monkeypatch.setattr(Engine, "generate", generating)
    # (when, False: not forced, else the position it is forced from)
    import inf_llm.bench.prose as prose_module

    built = []
    build = prose_module.build_prose_prompt
    monkeypatch.setattr(prose_module, "build_prose_prompt", lambda *args: built.append(build(*args)) or built[-1])
    runs = {(): [("read", False), ("reply", False)], ("--needle-oracle",): [("read", 0), ("reply", 0)],
            ("--needle-oracle", "reply"): [("read", False), ("reply", 0)],
            ("--needle-oracle", "question"): [("read", "question"), ("reply", "question")],
            ("--needle-oracle", "last:100"): [("read", "last 100"), ("reply", "last 100")]}
    for extra, expected in runs.items():
        forced_at.clear()
        assert main([*base, *extra]) == 0
        question = built[-1].context[1]  # where the document ends: the chunk that reaches it is forced on
        assert 100 < question < len(built[-1].ids) - 1
        where = {"question": question, "last 100": question - 100}
        expected = [(when, where.get(at, at)) for when, at in expected]
        assert [entry for entry in forced_at if entry[0] != "reset"] == expected, extra
        assert all(entry[1] is not True for entry in forced_at)  # 0 is not taken for True
    records = read_records(tmp_path / "prose.jsonl")
    assert sorted((r["case"].get("oracle"), r["label"].split(" needle")[0] != r["label"], r["label"].split()[0])
                  for r in records if "oracle" in r["case"]) == [
        ("needles", True, "inf-llm"), ("needles from 100 tokens before the question", True, "inf-llm"),
        ("needles from the question", True, "inf-llm"), ("needles while replying", True, "inf-llm")]
    assert not any("oracle" in r["label"] for r in records if "oracle" not in r["case"])
    assert len(records) == 6  # one plain case per method, one per oracle (a case already run is not run again)
    with pytest.raises(SystemExit) as stop:  # argparse's usage error, nothing run
        main([*base, "--needle-oracle", "last:many"])
    assert stop.value.code == 2 and "'many' is not a length" in capsys.readouterr().err
    prompt = build_prose_prompt(tokenizer, "multikey", 4096, 0.5, 0, paragraphs)
    (target,) = prompt.answer_needles
    start, end = prompt.needles[target]
    blocks = answer_blocks(prompt, 16, 8)
    assert blocks == list(range((start - 8) // 16, (end - 1 - 8) // 16 + 1))
    others = {(p - 8) // 16 for i, (a, e) in enumerate(prompt.needles) if i != target for p in range(a, e)}
    assert len(prompt.needles) == 4 and not others & set(blocks)  # the distractors are not forced


def test_dialogue_pastes_the_document_then_asks_each_question_as_the_chat_does(tiny_checkpoint, tokenizer, tmp_path,
                                                                            paragraphs, monkeypatch, capsys):
    """--dialogue: the document is a message of its own, the model's reply to it stays in the transcript, then each
    question is a message (multiquery: one word each); the memory holds exactly the chat format's rendering of that
    transcript, and full attention's last reply is the stock model's greedy reply to it."""
    from transformers import AutoModelForCausalLM

    from chat.chat_format import ChatFormat
    from inf_llm.bench.prose import PASTE_REPLY_TOKENS, converse
    from inf_llm.bench.prose_tasks import QUESTION, dialogue_of
    from inf_llm.config.schema import InfLLMConfig
    from inf_llm.generation.engine import Engine
    from inf_llm.model.loading import load_model

    prompt = build_prose_prompt(tokenizer, "multiquery", 700, 0.5, 0, paragraphs)
    dialogue = dialogue_of(prompt)
    assert prompt.content == f"{dialogue.paste}\n\n{prompt.question}" and prompt.question not in dialogue.paste
    words = [text.split(" for ")[1].split(" is: ")[0] for text in prompt.needle_texts]
    assert dialogue.questions == tuple((QUESTION.format(w), (v,)) for w, v in zip(words, prompt.answers))
    single = build_prose_prompt(tokenizer, "twohop", 700, 0.5, 0, paragraphs)
    assert dialogue_of(single).questions == ((single.question, single.answers),)

    model, tok = load_model(str(tiny_checkpoint))
    chat_format = ChatFormat.create(tok)
    for method in ("inf-llm", "full"):
        config = InfLLMConfig(method=method, num_sink_tokens=8, local_window=64, chunk_size=32, block_size=16,
                              topk_blocks=2, device_cache_blocks=8)
        engine = Engine(model, tok, config)
        record = converse(engine, prompt)
        turns = record["turns"]
        assert [t["question"] for t in turns] == [q for q, _ in dialogue.questions]
        assert all(t["score"] == score(tuple(t["answers"]), t["reply"]) for t in turns)
        assert record["score"] == sum(t["score"] for t in turns) / 4
        assert 1 <= record["paste_reply_tokens"] <= PASTE_REPLY_TOKENS
        messages = [{"role": "user", "content": dialogue.paste}, {"role": "assistant", "content": record["paste_reply"]}]
        for turn in turns:
            messages += [{"role": "user", "content": turn["question"]}, {"role": "assistant", "content": turn["reply"]}]
        assert engine.tokens == chat_format.render(messages) and record["memory_tokens"] == len(engine.tokens)
    # The reply to the document stops at its own budget, not the questions' (this random model does not end a turn
    # within 3 greedy tokens).
    with monkeypatch.context() as patched:
        patched.setattr("inf_llm.bench.prose.PASTE_REPLY_TOKENS", 3)
        assert converse(Engine(model, tok, config), prompt)["paste_reply_tokens"] == 3
    # The dense reference: the stock model's greedy reply to the transcript up to the last question.
    stock = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    asked = torch.tensor([chat_format.render(messages[:-1], add_generation_prompt=True)])
    last = turns[-1]["reply_ids"]
    expected = stock.generate(asked, max_new_tokens=len(last), do_sample=False, min_new_tokens=len(last))
    assert expected[0, asked.shape[1]:].tolist() == last

    corpus = tmp_path / "corpus.tar.gz"
    _archive(corpus, [_wrapped(paragraphs[:150]), _wrapped(paragraphs[150:])])
    monkeypatch.setenv("INF_LLM_CORPUS", str(corpus))
    base = ["prose", "--model-path", str(tiny_checkpoint), "--tasks", "single", "--lengths", "600", "--depths", "0.5",
            "--seeds", "1", "--methods", "inf-llm", "--out", str(tmp_path), *SMALL]
    assert main([*base, "--dialogue"]) == 0 and main(base) == 0
    plain, asked_apart = sorted(read_records(tmp_path / "prose.jsonl"), key=lambda r: "dialogue" in r["case"]["prompt"])
    assert asked_apart["label"] == plain["label"] + " dialogue"
    assert asked_apart["case"]["prompt"]["dialogue"] == {"paste_reply_tokens": PASTE_REPLY_TOKENS}
    assert len(asked_apart["turns"]) == 1 and "turns" not in plain
    assert main([*base, "--dialogue", "--needle-oracle"]) == 2
    assert "does not apply to --dialogue" in capsys.readouterr().err


# --- the retrieval trace --------------------------------------------------------------------------------------------


def test_trace_command_reports_every_step_and_a_class(tiny_checkpoint, tmp_path, paragraphs, monkeypatch, capsys):
    corpus = tmp_path / "corpus.tar.gz"
    _archive(corpus, [_wrapped(paragraphs[:150]), _wrapped(paragraphs[150:])])
    monkeypatch.setenv("INF_LLM_CORPUS", str(corpus))
    torch.set_num_threads(1)
    import inf_llm.bench.trace as trace_module

    asked = []
    real_answer = trace_module.answer
    monkeypatch.setattr(trace_module, "answer", lambda *a, **kw: (asked.append(kw), real_answer(*a, **kw))[1])
    assert main(["trace", "--model-path", str(tiny_checkpoint), "--length", "700", "--depth", "0.2",
                 "--min-new-tokens", "2", "--task", "twohop", *SMALL]) == 0
    assert asked == [{"min_new_tokens": 2, "fresh": False}]  # the chat's path, when asked for; traced from the start
    out = capsys.readouterr().out
    assert "prompt end" in out and out.count("needle at tokens") == 2 and "each needle: whole/part" in out
    assert any(name in out for name in ("answered", "never retrieved", "split at a block boundary",
                                        "dropped while decoding", "retrieved in too few layers",
                                        "retrieved and not used"))
    # Asked as a dialogue: the reply to the document, then a table per question (multiquery: four).
    assert main(["trace", "--model-path", str(tiny_checkpoint), "--length", "700", "--depth", "0.2",
                 "--task", "multiquery", "--dialogue", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "asked in a dialogue" in out and "reply to the document" in out and out.count("needle at tokens") == 4
    assert out.count("question: ") == 4 and out.count("prompt end") == 4


def test_trace_counts_each_needle_within_the_totals(tiny_checkpoint, paragraphs):
    from inf_llm.bench.trace import trace_case
    from inf_llm.config.schema import InfLLMConfig
    from inf_llm.generation.engine import Engine
    from inf_llm.model.loading import load_model

    torch.set_num_threads(1)
    model, tok = load_model(str(tiny_checkpoint))
    config = InfLLMConfig(num_sink_tokens=8, local_window=64, chunk_size=32, block_size=16, topk_blocks=3,
                          device_cache_blocks=8)
    prompt = build_prose_prompt(tok, "twohop", 700, 0.2, 0, paragraphs=paragraphs)
    result = trace_case(Engine(model, tok, config, prefill_chunk=128), prompt)
    assert len(result["steps"]) >= 2
    for step in result["steps"]:
        assert len(step.per_needle) == 2
        wholes, parts = zip(*step.per_needle)
        assert all(w <= p <= result["layers"] for w, p in step.per_needle)
        # Every needle whole in a layer is the needles whole there; any needle part of it is a part.
        assert step.layers_whole <= min(wholes) and max(parts) <= step.layers_part <= sum(parts)


@pytest.mark.parametrize("until", [None, "question"])
def test_dialogue_trace_follows_each_question_turn(tiny_checkpoint, paragraphs, monkeypatch, until):
    """trace --dialogue: the replies are those of the untraced dialogue; each question's turn is traced from its
    prompt's last chunk through its reply, with the needles where the pasted document put them in the conversation
    (multiquery: each turn follows the needle of its own word). With a short conversation that the first question
    takes past its limit, the trace follows the memory read again under the config's own settings."""
    from inf_llm.bench.prose import converse
    from inf_llm.bench.trace import trace_dialogue
    from inf_llm.config.schema import InfLLMConfig
    from inf_llm.generation.engine import Engine
    from inf_llm.model.loading import load_model

    torch.set_num_threads(1)
    monkeypatch.setattr("inf_llm.bench.prose.PASTE_REPLY_TOKENS", 3)
    model, tok = load_model(str(tiny_checkpoint))
    prompt = build_prose_prompt(tok, "multiquery", 700, 0.5, 0, paragraphs=paragraphs)
    settings = dict(num_sink_tokens=8, local_window=64, chunk_size=32, block_size=16, topk_blocks=2,
                    device_cache_blocks=8)
    if until is not None:  # the document and its 3-token reply within the limit, the first question past it
        settings.update(short_conversation={"local_window": 128, "topk_blocks": 1},
                        short_conversation_until=len(prompt.ids) - len(tok(prompt.question)["input_ids"]) + 8)
    config = InfLLMConfig(**settings)
    plain = converse(Engine(model, tok, config), prompt)
    engine = Engine(model, tok, config)
    rebuilt, rebuild = [], engine._rebuild
    monkeypatch.setattr(engine, "_rebuild", lambda *a, **kw: (rebuilt.append(len(engine.tokens)), rebuild(*a, **kw))[1])
    traced = trace_dialogue(engine, prompt)
    # Read again once, when the first question was asked: after the document and its reply.
    assert rebuilt == [] if until is None else len(rebuilt) == 1 and rebuilt[0] > max(e for _, e in prompt.needles)
    assert [t["reply"] for t in traced["turns"]] == [t["reply"] for t in plain["turns"]]
    assert traced["paste_reply"] == plain["paste_reply"] and len(traced["turns"]) == 4
    assert not engine.short  # the config's own settings answered every question
    for turn in traced["turns"]:
        (value,) = turn["answers"]
        i = next(i for i, text in enumerate(prompt.needle_texts) if value in text)  # the needle of the turn's word
        (a, e), (pa, pe) = turn["needles"][i], prompt.needles[i]
        assert engine.tokens[a:e] == prompt.ids[pa:pe]
        assert turn["needle_blocks"] == [list(range((a - 8) // 16, (e - 1 - 8) // 16 + 1))]
        steps = turn["steps"]
        assert steps[0].label == "prompt end" and steps[0].start < turn["prompt_tokens"] - 1
        assert [s.start for s in steps[1:]] == [turn["prompt_tokens"] - 1 + i for i in range(len(turn["reply_ids"]))]
        assert all(len(s.per_needle) == 1 for s in steps)
        assert turn["class"] in ("answered", "never retrieved", "split at a block boundary", "dropped while decoding",
                                 "retrieved in too few layers", "retrieved and not used", "in the window")


def test_trace_summaries_count_layers_and_classify(tokenizer, paragraphs):
    from inf_llm.bench.trace import StepSummary, classify

    prompt = build_prose_prompt(tokenizer, "single", 1024, 0.2, 0, paragraphs=paragraphs)

    def steps(prompt_end, whole, part):
        return [StepSummary("prompt end", 0, prompt_end, prompt_end, ((prompt_end, prompt_end),), 0, 0.1, ()),
                *[StepSummary(str(i), i + 1, w, p, ((w, p),), 0, 0.1, ())
                  for i, (w, p) in enumerate(zip(whole, part))]]

    assert classify(steps(10, [10, 10], [10, 10]), prompt, 1.0, 10, 128) == "answered"
    assert classify(steps(0, [0, 0], [0, 0]), prompt, 0.0, 10, 128) == "never retrieved"
    assert classify(steps(8, [2, 1], [9, 8]), prompt, 0.0, 10, 128) == "split at a block boundary"
    assert classify(steps(8, [2, 1], [3, 1]), prompt, 0.0, 10, 128) == "dropped while decoding"
    assert classify(steps(2, [2, 1], [3, 1]), prompt, 0.0, 10, 128) == "retrieved in too few layers"
    assert classify(steps(9, [9, 8], [9, 8]), prompt, 0.5, 10, 128) == "retrieved and not used"
    assert classify(steps(0, [0], [0]), prompt, 0.0, 10, 2048) == "in the window"

    # Two needles: the one retrieved in the fewest layers decides, named; one read everywhere and the other nowhere
    # is "never retrieved", not a needle split at a block boundary (as counting the two together would say).
    twohop = build_prose_prompt(tokenizer, "twohop", 1024, 0.2, 0, paragraphs=paragraphs)
    (a1, e1), (a2, e2) = (twohop.needles[i] for i in twohop.answer_needles)

    def two(first, second, prompt_end=((10, 10), (0, 0))):
        def summary(label, i, each):
            wholes, parts = zip(*each)
            return StepSummary(label, i, min(wholes), max(parts), each, 0, 0.1, ())
        return [summary("prompt end", 0, prompt_end),
                *[summary(str(i), i + 1, (f, s)) for i, (f, s) in enumerate(zip(first, second))]]

    assert classify(two([(10, 10)] * 2, [(0, 0)] * 2), twohop, 0.0, 10, 128) == \
        f"never retrieved (needle 2 of 2, tokens {a2}-{e2})"
    assert classify(two([(10, 10)] * 2, [(0, 0)] * 2, ((10, 10), (9, 9))), twohop, 0.0, 10, 128) == \
        f"dropped while decoding (needle 2 of 2, tokens {a2}-{e2})"
    assert classify(two([(1, 9)] * 2, [(10, 10)] * 2), twohop, 0.0, 10, 128) == \
        f"split at a block boundary (needle 1 of 2, tokens {a1}-{e1})"
    assert classify(two([(3, 4)] * 2, [(10, 10)] * 2, ((2, 4), (10, 10))), twohop, 0.0, 10, 128) == \
        f"retrieved in too few layers (needle 1 of 2, tokens {a1}-{e1})"
    assert classify(two([(9, 9)] * 2, [(8, 8)] * 2), twohop, 0.0, 10, 128) == "retrieved and not used"
    # A needle still in the local window is not memory's to retrieve: the other one decides.
    assert classify(two([(3, 4)] * 2, [(0, 0)] * 2, ((2, 4), (0, 0))), twohop, 0.0, 10, len(twohop.ids) - a2) == \
        f"retrieved in too few layers (needle 1 of 2, tokens {a1}-{e1})"
