"""The lm-eval model `inf-llm` (inf_llm/eval/) against lm-eval's own `hf` model, the dense reference and the benchmark.

Everything runs offline: tasks are local YAMLs over JSONL files (the `datasets` json builder), found through lm-eval's
include path; the models are a tiny random Llama saved here with the embedded model's tokenizer, and the embedded
model itself. Oracles:

- with a window covering the whole input (or the model's own attention, `smollm2-full`), every log-likelihood, greedy
  flag and greedy generation equals lm-eval's `hf` model on the same checkpoint (float32; 1e-4 on summed log-probs);
- with a small window and every memory block retrieved, log-likelihoods read through the memory in pieces equal the
  dense InfLLM reference (tests/tiny_models.py); requests sharing a context give the same numbers as alone;
- the exported prose task gives the model the benchmark's tokens and the benchmark's replies and scores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from inf_llm.bench.prose import answer  # noqa: E402
from inf_llm.bench.prose_tasks import MAX_NEW_TOKENS, build_prose_prompt, score  # noqa: E402
from inf_llm.config.schema import InfLLMConfig  # noqa: E402
from inf_llm.eval.lm import InfLLMEvalLM  # noqa: E402
from inf_llm.eval.prose_task import GROUP, export_prose_task, task_name  # noqa: E402
from tests.test_prose_bench import paragraphs  # noqa: E402,F401
from tests.tiny_models import dense_logits, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ATOL = 1e-4  # on a request's summed log-probability, float32
TASKS = ["tiny_mc", "tiny_rolling", "tiny_gen"]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """tests/tiny_models.py's random Llama with the embedded tokenizer's vocabulary, saved with that tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


_DOCS = [
    {"question": "Which colour is the sky on a clear day?", "choices": [" blue", " green", " a deep shade of red"],
     "label": 0, "text": "The river ran past the mill, and the miller counted every boat that went by."},
    {"question": "Alice was beginning to get very tired of sitting by her sister on the bank. What did she see?",
     "choices": [" a white rabbit", " a cat", " nothing at all"], "label": 0,
     "text": "Down, down, down. Would the fall never come to an end? 'I wonder how many miles I've fallen by this "
             "time?' she said aloud."},
    {"question": "Two plus two is", "choices": [" four", " five"], "label": 0, "text": "Short text."},
]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """Three local tasks over one JSONL file: multiple choice (loglikelihood), perplexity (loglikelihood_rolling)
    and greedy generation (generate_until)."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in _DOCS), encoding="utf-8")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
              "test_split: test\n")
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    (folder / "tiny_rolling.yaml").write_text(
        "task: tiny_rolling\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n    aggregation: weighted_perplexity\n"
        "    higher_is_better: false\n")
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{choices[label]}}'\ngeneration_kwargs:\n  until: []\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def _tasks(folder: Path) -> TaskManager:
    # Without lm-eval's own thousands of task files, which take it 10-20 s to index.
    return TaskManager(include_path=str(folder), include_defaults=False)


def _evaluate(model, model_args, tasks_dir: Path, tasks=TASKS, **kwargs) -> dict[str, list]:
    """Each task's per-document responses (`resps`) from lm-eval's Python API."""
    result = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks),
                                     task_manager=_tasks(tasks_dir), log_samples=True,
                                     bootstrap_iters=0, **kwargs)
    return {task: [sample["resps"] for sample in sorted(result["samples"][task], key=lambda s: s["doc_id"])]
            for task in tasks}


def _assert_same_responses(got: dict[str, list], expected: dict[str, list]) -> None:
    for task in expected:
        assert len(got[task]) == len(expected[task]) == len(_DOCS), task
        for doc_got, doc_expected in zip(got[task], expected[task]):
            for (g,), (e,) in zip(doc_got, doc_expected, strict=True):
                if isinstance(e, str):  # a greedy generation
                    assert g == e, task
                elif isinstance(e, (tuple, list)):  # (log-likelihood, is_greedy)
                    assert abs(g[0] - e[0]) <= ATOL and g[1] == e[1], (task, g, e)
                else:  # a rolling log-likelihood
                    assert abs(g - e) <= ATOL, (task, g, e)


def _covering_config(tmp_path: Path) -> Path:
    """InfLLM whose local window holds every token of the tiny tasks: reading in pieces changes nothing."""
    path = tmp_path / "covering.yaml"
    InfLLMConfig(method="inf-llm", num_sink_tokens=4, local_window=256, block_size=8, repr_tokens=2, topk_blocks=4,
                 chunk_size=16, device_cache_blocks=8, storage_dtype="float32").to_yaml(path)
    return path


# --- equality with lm-eval's `hf` model ---------------------------------------------------------------------------


def test_likelihoods_and_greedy_generations_equal_stock_transformers(tiny_checkpoint, tasks_dir, tmp_path):
    expected = _evaluate("hf", f"pretrained={tiny_checkpoint},device=cpu,dtype=float32", tasks_dir)
    # The model's own attention (the full-attention preset), and InfLLM with a window covering the input read in
    # pieces of 5 tokens: the same numbers as transformers.
    full = _evaluate("inf-llm", f"pretrained={tiny_checkpoint},inf_llm_config=smollm2-full,device=cpu", tasks_dir)
    _assert_same_responses(full, expected)
    covering = _evaluate("inf-llm", f"pretrained={tiny_checkpoint},inf_llm_config={_covering_config(tmp_path)},"
                                    "device=cpu,prefill_chunk=5", tasks_dir)
    _assert_same_responses(covering, expected)


def _instances(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def test_greedy_continuations_are_greedy_and_empty_contexts_use_the_prefix_token(tiny_checkpoint):
    from lm_eval.models.huggingface import HFLM

    ours = InfLLMEvalLM(pretrained=str(tiny_checkpoint), inf_llm_config="smollm2-full", device="cpu")
    stock = HFLM(pretrained=str(tiny_checkpoint), device="cpu", dtype="float32")
    contexts = [doc["question"] for doc in _DOCS]
    replies = ours.generate_until(_instances("generate_until", [(c, {"until": [], "max_gen_toks": 6})
                                                                for c in contexts]))
    requests = [(c, r) for c, r in zip(contexts, replies)] + [("", " The river ran past the mill."), ("", "Short")]
    got = ours.loglikelihood(_instances("loglikelihood", requests))
    expected = stock.loglikelihood(_instances("loglikelihood", requests))
    for g, e in zip(got, expected, strict=True):
        assert abs(g[0] - e[0]) <= ATOL and g[1] == e[1], (g, e)
    # A continuation the model generated greedily is greedy, where its text re-tokenises into the generated tokens.
    assert sum(greedy for _, greedy in got[: len(contexts)]) >= 1


# --- reading through the memory -----------------------------------------------------------------------------------


def _memory_config(tmp_path: Path) -> Path:
    """A 32-token window with every block retrieved: the dense reference gives the exact InfLLM logits."""
    path = tmp_path / "memory.yaml"
    InfLLMConfig(method="inf-llm", num_sink_tokens=4, local_window=32, block_size=8, repr_tokens=2, topk_blocks=32,
                 chunk_size=16, device_cache_blocks=32, storage_dtype="float32", kernel_backend="torch",
                 memory_positions="shared").to_yaml(path)
    return path


def _dense_log_probs(checkpoint: Path, ids: list[int], config: InfLLMConfig) -> torch.Tensor:
    """log p(ids[i + 1] | ids[: i + 1]) for every i, by the dense reference of InfLLM with every block retrieved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, local_files_only=True).eval()
    logits = dense_logits(model, torch.tensor(ids), "inf-llm", config.local_window, config.num_sink_tokens)
    return torch.log_softmax(logits[:-1].double(), dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_long_inputs_read_through_the_memory_equal_the_dense_reference(tiny_checkpoint, tokenizer, tmp_path):
    config_path = _memory_config(tmp_path)
    ours = InfLLMEvalLM(pretrained=str(tiny_checkpoint), inf_llm_config=str(config_path), device="cpu",
                        prefill_chunk=50)
    text = " ".join(doc["text"] for doc in _DOCS * 3)
    cut = text.rindex(" ", 0, len(text) * 3 // 4)
    context, continuation = text[:cut], text[cut:]
    ids = ours.tok_encode(text)
    assert len(ids) > 150  # several prefill pieces, and a memory well beyond the window

    (rolling,) = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    assert ours.engine.stats().blocks >= 10  # blocks were stored and retrieved
    reference = _dense_log_probs(tiny_checkpoint, [ours.prefix_token_id] + ids, ours.engine.config)
    assert math.isclose(rolling, float(reference.sum()), abs_tol=1e-3), (rolling, float(reference.sum()))

    (pair,) = ours.loglikelihood(_instances("loglikelihood", [(context, continuation)]))
    context_ids = ours.tok_encode(context)
    assert ids[: len(context_ids)] == context_ids
    reference = _dense_log_probs(tiny_checkpoint, ids, ours.engine.config)[len(context_ids) - 1 :]
    assert math.isclose(pair[0], float(reference.sum()), abs_tol=1e-3), (pair, float(reference.sum()))


def test_requests_sharing_a_context_give_what_each_gives_alone(tiny_checkpoint, tmp_path):
    """The context is read once and the memory restored for each continuation: exactly what reading it again gives."""
    ours = InfLLMEvalLM(pretrained=str(tiny_checkpoint), inf_llm_config=str(_memory_config(tmp_path)), device="cpu",
                        prefill_chunk=40, topk_blocks=2, device_cache_blocks=4)
    context = " ".join(doc["text"] for doc in _DOCS * 3)
    requests = [(context, " one two three"), (_DOCS[0]["question"], " blue sky"), (context, " four five six seven"),
                (context, " one two three")]
    together = ours.loglikelihood(_instances("loglikelihood", requests))
    alone = [ours.loglikelihood(_instances("loglikelihood", [request]))[0] for request in requests]
    assert together == alone and together[0] == together[3]
    assert ours.engine.config.topk_blocks == 2  # --model_args fields override the config file


def test_generate_until_honours_stop_sequences_and_the_token_budget(tiny_checkpoint):
    ours = InfLLMEvalLM(pretrained=str(tiny_checkpoint), inf_llm_config="smollm2-full", device="cpu")
    question = _DOCS[1]["question"]

    def generate(**gen_kwargs) -> str:
        return ours.generate_until(_instances("generate_until", [(question, gen_kwargs)]))[0]

    free = generate(until=[], max_gen_toks=12)
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop and generate(until=[stop], max_gen_toks=12) == free.split(stop)[0]
    short = generate(until=[], max_gen_toks=3)
    assert free.startswith(short) and len(short) < len(free)
    assert generate(until="", max_new_tokens=12) == free  # lm-eval's aliases of the budget
    with pytest.raises(ValueError, match="num_beams"):
        generate(until=[], num_beams=4)
    with pytest.raises(ValueError, match="topk_block"):
        InfLLMEvalLM(pretrained=str(tiny_checkpoint), topk_block=4)


# --- the prose benchmark as an lm-eval task -----------------------------------------------------------------------


def test_exported_prose_task_gives_the_benchmarks_tokens_replies_and_scores(tiny_checkpoint, tokenizer, paragraphs,
                                                                           tmp_path):
    folder = tmp_path / "prose-task"
    cases = [(task, 600, 0.5, seed) for task in ("single", "multivalue") for seed in (0, 1)]
    export_prose_task(tokenizer, folder, ["single", "multivalue"], [600], [0.5], seeds=2, paragraphs=paragraphs)
    ours = InfLLMEvalLM(pretrained=str(tiny_checkpoint), device="cpu", prefill_chunk=128, num_sink_tokens=8,
                        local_window=64, chunk_size=32, block_size=16, topk_blocks=2, device_cache_blocks=4)
    result = lm_eval.simple_evaluate(model=ours, tasks=[GROUP], task_manager=_tasks(folder),
                                     apply_chat_template=True, log_samples=True, bootstrap_iters=0)
    bench_scores = []
    for task in ("single", "multivalue"):
        samples = sorted(result["samples"][task_name(task)], key=lambda s: s["doc_id"])
        assert [(s["doc"]["task"], s["doc"]["length"], s["doc"]["depth"], s["doc"]["seed"]) for s in samples] == \
            [case for case in cases if case[0] == task]
        for sample in samples:
            doc = sample["doc"]
            prompt = build_prose_prompt(tokenizer, task, doc["length"], doc["depth"], doc["seed"], paragraphs)
            (context, gen_kwargs), = [sample["arguments"][0]]
            assert ours.tok_encode(context) == prompt.ids  # lm-eval's chat rendering is the benchmark's prompt
            assert gen_kwargs["max_gen_toks"] == MAX_NEW_TOKENS[task] and gen_kwargs["until"] == []
            bench = answer(ours.engine, prompt)  # the benchmark's own reading and greedy answer
            assert sample["resps"] == [[bench["reply"]]]
            assert sample["score"] == bench["score"] == score(prompt.answers, bench["reply"])
            bench_scores.append(bench["score"])
    group = result["results"][GROUP]
    assert math.isclose(group["score,none"], sum(bench_scores) / len(bench_scores), abs_tol=1e-12)


# --- the embedded model, the command line, and the chat without lm-eval ---------------------------------------


@pytest.mark.slow
def test_embedded_model_equals_stock_transformers_with_its_chat_template(tasks_dir):
    """No `pretrained`: the embedded SmolLM2 with its default preset, whose 128-token window covers these tasks;
    lm-eval's `hf` model reads the embedded model's converted checkpoint. Both with --apply_chat_template."""
    from inf_llm.model.loading import embedded_cache_dir

    tasks = ["tiny_mc", "tiny_rolling"]
    ours = _evaluate("inf-llm", "device=cpu", tasks_dir, tasks, apply_chat_template=True)
    expected = _evaluate("hf", f"pretrained={embedded_cache_dir()},device=cpu,dtype=float32", tasks_dir, tasks,
                         apply_chat_template=True)
    _assert_same_responses(ours, expected)


@pytest.mark.slow  # the command indexes lm-eval's thousands of task files first: 15-30 s
def test_command_line_runs_offline_with_model_args(tiny_checkpoint, tasks_dir, tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "-m", "inf_llm.eval", "--model", "inf-llm", "--model_args",
               f"pretrained={tiny_checkpoint},inf_llm_config=smollm2-full,device=cpu", "--include_path",
               str(tasks_dir), "--tasks", "tiny_mc", "--output_path", str(out)]
    run = subprocess.run(command, cwd=tmp_path, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    assert "acc,none" in json.loads(results.read_text())["results"]["tiny_mc"]


def test_the_chat_and_the_library_do_not_need_lm_eval():
    """lm-eval is an extra: nothing but inf_llm.eval.lm imports it, and without it the command says what to install."""
    script = ("import sys; sys.modules['lm_eval'] = None\n"  # as if it were not installed
              "import inf_llm, inf_llm.chat, chat.cli, inf_llm.bench.__main__, inf_llm.eval.prose_task\n"
              "from inf_llm.eval.__main__ import main\n"
              "sys.exit(main(['--tasks', 'x']))\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=OFFLINE, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and 'pip install -e ".[eval]"' in run.stderr, run.stderr[-2000:]
