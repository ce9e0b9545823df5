"""Benchmarks of InfLLM against its baselines, in the same run on the same machine, so that ratios are fair.

Run `python -m inf_llm.bench --help`. Sub-commands:

- `passkey`: retrieval accuracy over lengths x depths x seeds (the paper's passkey task, section 4.2);
- `speed`: prefill tokens/s, decode ms/token and process memory vs context length, with the float32 matmul
  peak and the prefill efficiency (model FLOPs / time / peak) of the same run;
- `gpu`: prefill, decode and peak GPU memory of a random-weight model of Mistral-7B's shapes, toward 1M tokens;
- `table` / `plot`: print a result file's tables (`--markdown` for BENCHMARKS.md) / redraw its PNG (e.g. after
  copying a GPU run's JSONL back from a machine without matplotlib).

Each writes one JSON line per finished case to `<out>/<name>.jsonl` (a stopped run continues where it left off),
prints a table and draws a small PNG. Files: `prompt.py` (the passkey prompt), `methods.py` (which settings each
method runs), `results.py` (the JSONL log), `passkey.py`, `speed.py`, `flops.py` (matmul peak, model FLOPs),
`gpu.py`, `table_data.py` (tables as data, plain text and Markdown), `display.py` (rich tables, progress bars),
`plot.py` (PNGs), `__main__.py` (the command line).

rich and matplotlib are imported only by the sub-commands that draw with them: the GPU machine has neither, and
`gpu` runs there on torch, transformers and pyyaml alone (a test checks it).
"""
