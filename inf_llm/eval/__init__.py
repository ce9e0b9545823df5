"""InfLLM in EleutherAI's lm-evaluation-harness (`lm-eval`, installed by the `eval` extra: `pip install -e ".[eval]"`).

- `inf_llm.eval.lm`: the lm-eval model `inf-llm`, backed by our `Engine`; importing it registers the name.
- `python -m inf_llm.eval ARGS` (or the console script `inf-llm-eval ARGS`): lm-eval's own command line, with
  `inf-llm` registered first. lm-eval 0.4.13 discovers no third-party models (no entry points), so the plain
  `lm_eval --model inf-llm` cannot find it; this is that command with the import done.
- `inf_llm.eval.prose_task`: the long-document benchmark's cases as a local lm-eval task (YAML over JSONL), written
  by `python -m inf_llm.bench prose ... --export-lm-eval DIR`, scored as the benchmark scores them.

Nothing here is imported by the chat or the library, so they run without lm-eval.
"""
