"""The long-document benchmark's cases (`inf_llm.bench.prose_tasks`) as a local lm-eval task.

`python -m inf_llm.bench prose ... --export-lm-eval DIR` writes, for the cases that command would run:

- `DIR/prose_<task>.jsonl`: one case a line, in the benchmark's order (length, depth, seed): the user message
  (`content`: instruction, document with its needles, question), the expected numbers, and the case's key;
- `DIR/inf_llm_prose_<task>.yaml`: an lm-eval task over that file (the `datasets` json builder: nothing downloads),
  `generate_until`, greedy, with the benchmark's token budget for the task and no stop sequence but EOS, scored by
  `process_results` below: the benchmark's score (the fraction of the expected numbers in the reply);
- `DIR/inf_llm_prose.yaml`: the group of them (`--tasks inf_llm_prose`), the mean score over every case.

The benchmark sends the message through the tokenizer's chat template, so the task is run with lm-eval's
`--apply_chat_template` (no system instruction, no few-shot): lm-eval then renders the same single user message,
and the model reads the same tokens as `python -m inf_llm.bench prose` does (tests/test_lm_eval.py checks it).
lm-eval finds the task with `--include_path DIR`. The data file is named by its absolute path.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inf_llm.bench.prose_tasks import MAX_NEW_TOKENS, PROMPT_VERSION, build_prose_prompt, score

GROUP = "inf_llm_prose"


def task_name(task: str) -> str:
    return f"{GROUP}_{task}"


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval's per-document scoring: the benchmark's score of the reply, and whether it found every number."""
    value = score(tuple(doc["answers"]), results[0])
    return {"score": value, "correct": float(value == 1.0)}


def export_prose_task(tokenizer, out_dir: str | Path, tasks: Sequence[str], lengths: Sequence[int],
                      depths: Sequence[float], seeds: int, first_seed: int = 0,
                      paragraphs: tuple[str, ...] | None = None) -> list[Path]:
    """Write the JSONL files and lm-eval YAMLs of these cases into out_dir; return the paths written."""
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in tasks:
        rows = []
        for length in sorted(lengths):
            for depth in depths:
                for seed in range(first_seed, first_seed + seeds):
                    prompt = build_prose_prompt(tokenizer, task, length, depth, seed, paragraphs)
                    rows.append({"task": task, "length": length, "depth": depth, "seed": seed,
                                 "tokens": len(prompt.ids), "content": prompt.content,
                                 "question": prompt.question, "answers": list(prompt.answers),
                                 "prompt_version": PROMPT_VERSION})
        data = out / f"prose_{task}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        spec = out / f"{task_name(task)}.yaml"
        spec.write_text(_task_yaml(task, data), encoding="utf-8")
        written += [data, spec]
    group = out / f"{GROUP}.yaml"
    group.write_text(_group_yaml(tasks), encoding="utf-8")
    return written + [group]


_HEADER = ("# Written by `python -m inf_llm.bench prose ... --export-lm-eval DIR` (inf_llm/eval/prose_task.py).\n"
           "# Run with lm-eval's --apply_chat_template: the benchmark asks as a chat user does.\n")


def _task_yaml(task: str, data: Path) -> str:
    # JSON strings are YAML strings: json.dumps quotes the path whatever it holds.
    return _HEADER + f"""task: {task_name(task)}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: generate_until
doc_to_text: "{{{{content}}}}"
doc_to_target: "{{{{answers | join(' ')}}}}"
generation_kwargs:
  until: []
  max_gen_toks: {MAX_NEW_TOKENS[task]}
  do_sample: false
process_results: !function inf_llm.eval.prose_task.process_results
metric_list:
  - metric: score
    aggregation: mean
    higher_is_better: true
  - metric: correct
    aggregation: mean
    higher_is_better: true
metadata:
  version: {PROMPT_VERSION}
"""


def _group_yaml(tasks: Sequence[str]) -> str:
    names = "".join(f"  - {task_name(task)}\n" for task in tasks)
    return _HEADER + f"""group: {GROUP}
task:
{names}aggregate_metric_list:
  - metric: score
    aggregation: mean
    weight_by_size: true
  - metric: correct
    aggregation: mean
    weight_by_size: true
metadata:
  version: {PROMPT_VERSION}
"""
