"""Command line of the benchmarks: `python -m inf_llm.bench {passkey,speed,gpu,loops,table,plot} ...`.

Results go to `<out>/<name>.jsonl` (one JSON line per finished case; rerun the same command to continue a stopped
run, `--fresh` to start over), with a table printed and `<out>/<name>.png` drawn. `table FILE [--markdown]` and
`plot FILE` redraw them from a file. Sub-command modules are
imported when chosen: `gpu` runs on machines without rich or matplotlib.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

logger = logging.getLogger("inf_llm.bench")

_UNITS = {"K": 1024, "M": 1024 * 1024}


def parse_length(text: str) -> int:
    """"4096", "4K", "64k", "1M" -> tokens (K = 1024)."""
    text = text.strip()
    scale = _UNITS.get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a length: give tokens as 4096, 4K or 1M") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a length: it must be positive")
    return value


def parse_lengths(text: str) -> tuple[int, ...]:
    return tuple(sorted({parse_length(part) for part in text.split(",") if part.strip()}))


def parse_bytes(text: str) -> int:
    """"2G", "512M", "1000000" -> bytes (G = 2**30, M = 2**20, K = 2**10)."""
    text = text.strip()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes as 2G, 512M or 1000000") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: it must not be negative")
    return value


def parse_oracle(text: str) -> str:
    """--needle-oracle's mode: all, question, reply or last:N (N a length, as 8K); last:N is kept as "last:<tokens>"."""
    text = text.strip()
    if text in ("all", "question", "reply"):
        return text
    if text.startswith("last:"):
        return f"last:{parse_length(text[5:])}"
    raise argparse.ArgumentTypeError(f"{text!r}: give all, question, reply or last:N (N tokens, as 8K)")


def parse_tasks(text: str) -> tuple[str, ...]:
    from inf_llm.bench.prose_tasks import TASKS

    tasks = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"{text!r}: give tasks from {', '.join(TASKS)}")
    return tasks


def parse_depths(text: str) -> tuple[float, ...]:
    try:
        depths = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give depths as fractions, e.g. 0.1,0.5,0.9") from None
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise argparse.ArgumentTypeError(f"{text!r}: depths are fractions in [0, 1], e.g. 0.1,0.5,0.9")
    return depths


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _add_min_new_tokens(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-new-tokens", type=int, default=0,
                        help="the reply's first N tokens are never the end of the turn (default: 0, the model's choice)")


def _add_output(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench_results"),
                        help="folder of the results (default: %(default)s)")
    parser.add_argument("--name", default=name, help="result file name, without .jsonl (default: %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="start a new result file (the old one is kept as .bak)")


def _add_settings(parser: argparse.ArgumentParser, methods: str) -> None:
    parser.add_argument("--inf-llm-config-path", help="InfLLM preset (YAML) for inf-llm; the baselines use its sinks, "
                        "window and chunk (default: the model's preset)")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="override an InfLLMConfig field for every method, e.g. --set topk_blocks=4 (repeatable)")
    parser.add_argument("--methods", default=methods, help="comma-separated, from inf-llm, stream-llm, infinite-lm, "
                        "full (default: %(default)s)")
    parser.add_argument("--tag", help="text added to every method's label, to tell apart runs of different presets")
    parser.add_argument("--compare", action="append", metavar="KEY=VALUE[,KEY=VALUE]",
                        help="also run inf-llm with these settings, e.g. --compare storage_dtype=int8 (repeatable)")


def _add_inf_llm_settings(parser: argparse.ArgumentParser, example: str) -> None:
    """The settings of a command that runs inf-llm alone: a preset and overrides."""
    parser.add_argument("--inf-llm-config-path", help="InfLLM preset (YAML) (default: the model's preset)")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help=f"override an InfLLMConfig field, e.g. --set {example} (repeatable)")


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path",
                        help="a Hugging Face checkpoint folder or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="accelerate device map for a model larger than one device, e.g. auto (each layer's "
                             "memory then lives with its weights); replaces --device")
    parser.add_argument("--prefill-chunk", type=_positive_int, default=2048,
                        help="tokens per model call while reading (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inf_llm.bench", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    passkey = commands.add_parser("passkey", help="passkey retrieval accuracy over lengths x depths x seeds")
    _add_model(passkey)
    _add_settings(passkey, "inf-llm,stream-llm,full")
    _add_output(passkey, "passkey")
    passkey.add_argument("--lengths", type=parse_lengths, default=parse_lengths("4K,8K,16K"),
                         help="prompt lengths in tokens (default: 4K,8K,16K)")
    passkey.add_argument("--depths", type=parse_depths, default=(0.1, 0.5, 0.9),
                         help="needle depths, fractions of the context (default: 0.1,0.5,0.9)")
    passkey.add_argument("--seeds", type=_positive_int, default=5,
                         help="keys per length and depth (default: %(default)s)")
    passkey.add_argument("--full-max-len", type=parse_length, default=parse_length("16K"),
                         help="longest prompt given to full attention (default: 16K)")
    passkey.add_argument("--max-new-tokens", type=_positive_int, default=8, help="answer length (default: %(default)s)")
    passkey.add_argument("--answer-prefix", default=None,
                         help="text the answer starts with (default: 'The pass key is')")
    passkey.add_argument("--no-chat-template", action="store_true", help="raw prompt, for base models")

    prose = commands.add_parser("prose", help="long documents of natural prose: needle tasks answered as a chat user "
                                "asks (chat template, free greedy answer)")
    _add_model(prose)
    _add_settings(prose, "inf-llm,stream-llm,full")
    _add_output(prose, "prose")
    prose.add_argument("--tasks", type=parse_tasks, default="single,multikey,multivalue,multiquery,twohop",
                       help="comma-separated, from single, multikey, multivalue, multiquery, twohop (default: all)")
    prose.add_argument("--lengths", type=parse_lengths, default=parse_lengths("4K,8K,16K"),
                       help="prompt lengths in tokens (default: 4K,8K,16K)")
    prose.add_argument("--depths", type=parse_depths, default=(0.1, 0.5, 0.9),
                       help="depths of the target needle, fractions of the document (default: 0.1,0.5,0.9)")
    prose.add_argument("--seeds", type=_positive_int, default=5, help="cases per task, length and depth (default: 5)")
    prose.add_argument("--first-seed", type=int, default=0, help="seeds run from this one (default: 0)")
    prose.add_argument("--repetition-penalty", type=float, default=1.0,
                       help="the chat's penalty on what a reply repeats beyond its context (default: 1.0, none; "
                            "the chat's default is 1.2)")
    _add_min_new_tokens(prose)
    prose.add_argument("--needle-oracle", nargs="?", const="all", type=parse_oracle, default=None,
                       help="analysis: inf-llm retrieves the blocks of the needles that hold the answer in every layer, "
                            "besides its own choice, at every step (all, the default: is the needle enough once "
                            "retrieved?), from the chunk that reaches the question on (question: was the document "
                            "read well enough?), from the chunk that reaches the document's last N tokens on (last:N, "
                            "e.g. last:8K: how much of the prose before the question must have read them?) or only "
                            "while the reply is decoded (reply: is the prompt's reading at fault?)")
    prose.add_argument("--dialogue", action="store_true",
                       help="ask as a chat user who pastes the document first: the document is one message (the model "
                            "replies to it), then each question a message of its own (multiquery: its four words one "
                            "at a time), through the chat's conversation")
    prose.add_argument("--full-max-len", type=parse_length, default=parse_length("8K"),
                       help="longest prompt given to full attention (default: 8K)")
    prose.add_argument("--stream-max-len", type=parse_length, default=None,
                       help="longest prompt given to StreamingLLM (default: every length)")
    prose.add_argument("--export-lm-eval", type=Path, default=None, metavar="DIR",
                       help="write these cases as a local lm-eval task into DIR instead of running them "
                            "(inf_llm/eval/prose_task.py; run it with python -m inf_llm.eval --include_path DIR)")

    trace = commands.add_parser("trace", help="one prose case with a retrieval trace: where the needles are, which "
                                "blocks each layer chose at each step, and why the answer failed (inf-llm only)")
    _add_model(trace)
    _add_inf_llm_settings(trace, "topk_blocks=16")
    trace.add_argument("--task", type=parse_tasks, default="single", help="the task (default: single)")
    trace.add_argument("--length", type=parse_length, default=parse_length("4K"), help="prompt length (default: 4K)")
    trace.add_argument("--depth", type=float, default=0.5, help="target needle depth (default: 0.5)")
    trace.add_argument("--seed", type=int, default=0, help="the case's seed (default: 0)")
    trace.add_argument("--dialogue", action="store_true",
                       help="ask as prose --dialogue does (the document pasted, then each question a message of its "
                            "own) and trace each question's turn")
    _add_min_new_tokens(trace)

    speed = commands.add_parser("speed", help="prefill tokens/s, decode ms/token and memory vs context length")
    _add_model(speed)
    _add_settings(speed, "inf-llm,stream-llm,full")
    _add_output(speed, "speed")
    speed.add_argument("--lengths", type=parse_lengths, default=parse_lengths("4K,8K,16K,32K,64K"),
                       help="context lengths (default: 4K,8K,16K,32K,64K)")
    speed.add_argument("--full-max-len", type=parse_length, default=parse_length("32K"),
                       help="longest context given to full attention (default: 32K)")
    speed.add_argument("--decode-tokens", type=_positive_int, default=16,
                       help="tokens decoded after the prefill; decode ms/token is their mean (default: %(default)s)")
    speed.add_argument("--peak-seconds", type=_positive_float, default=2.0, help="time spent measuring the matmul peak")
    speed.add_argument("--in-process", action="store_true",
                       help="measure in this process instead of a fresh process per case (RSS then less reliable)")

    gpu = commands.add_parser("gpu", help="Mistral-7B shapes, random bf16 weights on CUDA: 32K toward 1M tokens")
    _add_settings(gpu, "inf-llm,full")
    _add_output(gpu, "gpu")
    gpu.add_argument("--tiny", action="store_true", help="a tiny Mistral on the CPU (tests the script without a GPU)")
    gpu.add_argument("--lengths", type=parse_lengths, default=None,
                     help="default: 32K,128K,256K,512K,1M (tiny: 256,1K,2K)")
    gpu.add_argument("--budget-s", type=_positive_float, default=420.0,
                     help="seconds from process start for everything (default: %(default)s, under 8 minutes)")
    gpu.add_argument("--full-share", type=_positive_float, default=0.4,
                     help="share of the time left for full attention, which runs first (default: %(default)s)")
    gpu.add_argument("--decode-tokens", type=_positive_int, default=8, help="decode tokens per length")
    gpu.add_argument("--prefill-chunk", type=_positive_int, default=4096, help="tokens per model call while reading")

    long_read = commands.add_parser("long-read", help="a prose document up to 1M tokens under a RAM budget, needles "
                                    "at several depths, each asked for alone (inf-llm only)")
    _add_model(long_read)
    _add_inf_llm_settings(long_read, "storage_dtype=int8")
    _add_output(long_read, "long-read")
    long_read.add_argument("--lengths", type=parse_lengths, default=parse_lengths("4K,1M"),
                           help="document lengths, the shortest being the control (default: 4K,1M)")
    long_read.add_argument("--depths", type=parse_depths, default=(0.1, 0.5, 0.9),
                           help="one needle at each depth (default: 0.1,0.5,0.9)")
    long_read.add_argument("--one-needle", action="store_true",
                           help="a document of its own for each depth (single-needle prompts: one read per depth)")
    long_read.add_argument("--seed", type=int, default=0, help="draws the words, numbers and prose start (default: 0)")
    long_read.add_argument("--host-cache-bytes", type=parse_bytes, default=parse_bytes("2G"),
                           help="RAM for memory blocks, all layers (default: 2G); the rest goes to disk")
    long_read.add_argument("--disk-dir", help="parent folder of the disk tier (default: the system's temporary one)")
    long_read.add_argument("--every", type=parse_length, default=parse_length("64K"),
                           help="tokens between checkpoints (the session saved, a memory record) while reading "
                                "(default: 64K)")
    long_read.add_argument("--max-new-tokens", type=_positive_int, default=32, help="answer length (default: %(default)s)")
    long_read.add_argument("--keep-sessions", action="store_true",
                           help="keep each document's saved session (beside the results) after its record")
    long_read.add_argument("--needle-oracle", action="store_true",
                           help="for analysis: force the needles' blocks into every layer's choice from the first "
                                "token on (records and checkpoints of their own)")

    table = commands.add_parser("table", help="print the tables of a result file (--markdown for BENCHMARKS.md)")
    table.add_argument("file", type=Path, help="a .jsonl result file")
    table.add_argument("--markdown", action="store_true", help="Markdown tables instead of terminal ones")

    from inf_llm.bench import loops
    loops.add_arguments(commands.add_parser("loops", help="everyday prompts at candidate sampling defaults: how many "
                                            "first-chat replies loop (embedded model, CPU)"))

    plot = commands.add_parser("plot", help="redraw the PNG of a result file")
    plot.add_argument("file", type=Path, help="a .jsonl result file")
    plot.add_argument("--png", type=Path, help="output path (default: next to the file, .png)")
    return parser


# --- shared steps -------------------------------------------------------------------------------------------


def _load(args):
    from inf_llm.model.loading import embedded_gguf_path, load_model

    if args.device_map is not None:
        model, tokenizer = load_model(args.model_path, device=None, device_map=args.device_map)
    else:
        model, tokenizer = load_model(args.model_path, device=args.device)
    model_id = f"embedded:{embedded_gguf_path().name}" if args.model_path is None \
        else str(Path(args.model_path).expanduser().resolve())
    return model, tokenizer, model_id


def _main_device(model, args) -> str:
    """--device, or with --device-map the device of the input embeddings (where the matmul peak is measured)."""
    if args.device_map is None:
        return args.device
    from inf_llm.model.placement import execution_device

    return str(execution_device(model.get_input_embeddings()))


def _runs(args, model_type: str | None, default_config=None):
    from inf_llm.bench.methods import method_runs, parse_methods, parse_overrides, variant_runs
    from inf_llm.config.files import load_config
    from inf_llm.config.presets import default_preset_for

    if args.inf_llm_config_path:
        loaded = load_config(args.inf_llm_config_path)
        for note in loaded.notes:
            logger.warning("%s: %s", args.inf_llm_config_path, note)
        base = loaded.config
    elif default_config is not None:
        base = default_config
    else:
        base = load_config(default_preset_for(model_type)).config
    overrides = parse_overrides(args.overrides)
    return (method_runs(base, parse_methods(args.methods), overrides, args.tag)
            + variant_runs(base, overrides, getattr(args, "compare", None), args.tag))


def _run_cases(args, console, kind: str, table_fn, run) -> None:
    """Load the model, run the cases not yet in the result log (`run(model, tokenizer, model_id, runs, log=,
    console=)`), then print the table and draw the plot, also when stopped."""
    from inf_llm.bench.results import ResultLog

    model, tokenizer, model_id = _load(args)
    runs = _runs(args, None if args.model_path is None else model.config.model_type)
    log = ResultLog(args.out / f"{args.name}.jsonl", fresh=args.fresh)
    try:
        run(model, tokenizer, model_id, runs, log=log, console=console)
    finally:
        _finish(console, log, kind, model_id, table_fn)


def _finish(console, log, kind: str, model_id: str | None, table_fn) -> None:
    from inf_llm.bench.display import to_rich
    from inf_llm.bench.plot import plot_records

    records = [r for r in log.records_of(kind) if model_id is None or r["case"].get("model") == model_id]
    if not records:
        console.print("no results yet")
        return
    console.print(to_rich(table_fn(records)))
    for path in plot_records(records, log.path.with_suffix(".png")):
        console.print(f"results: {log.path}   plot: {path}")


# --- sub-commands -------------------------------------------------------------------------------------------


def cmd_passkey(args, console) -> None:
    from inf_llm.bench.display import passkey_table
    from inf_llm.bench.passkey import KIND, PasskeyPlan, run_passkey
    from inf_llm.bench.prompt import ANSWER_PREFIX

    plan = PasskeyPlan(lengths=args.lengths, depths=args.depths, seeds=args.seeds, full_max_len=args.full_max_len,
                       max_new_tokens=args.max_new_tokens,
                       answer_prefix=ANSWER_PREFIX if args.answer_prefix is None else args.answer_prefix,
                       chat_template=not args.no_chat_template, prefill_chunk=args.prefill_chunk)
    _run_cases(args, console, KIND, passkey_table, functools.partial(run_passkey, plan=plan))


def cmd_prose(args, console) -> None:
    from inf_llm.bench.corpus import load_paragraphs
    from inf_llm.bench.display import prose_table
    from inf_llm.bench.prose import KIND, ProsePlan, run_prose

    load_paragraphs()  # a missing corpus fails before the model loads
    if args.export_lm_eval is not None:
        if args.dialogue:
            raise ValueError("--export-lm-eval writes one-message prompts; it does not apply to --dialogue")
        from inf_llm.eval.prose_task import GROUP, export_prose_task

        _, tokenizer, _ = _load(args)
        for path in export_prose_task(tokenizer, args.export_lm_eval, args.tasks, args.lengths, args.depths,
                                      args.seeds, args.first_seed):
            console.print(f"wrote {path}")
        console.print(f"run: python -m inf_llm.eval --model inf-llm --include_path {args.export_lm_eval} "
                      f"--tasks {GROUP} --apply_chat_template --model_args ...")
        return
    plan = ProsePlan(tasks=args.tasks, lengths=args.lengths, depths=args.depths, seeds=args.seeds,
                     full_max_len=args.full_max_len, stream_max_len=args.stream_max_len,
                     prefill_chunk=args.prefill_chunk, first_seed=args.first_seed,
                     repetition_penalty=args.repetition_penalty, needle_oracle=args.needle_oracle,
                     min_new_tokens=args.min_new_tokens, dialogue=args.dialogue)
    _run_cases(args, console, KIND, prose_table, functools.partial(run_prose, plan=plan))


def cmd_trace(args, console) -> None:
    from rich.markup import escape

    from inf_llm.bench.corpus import load_paragraphs
    from inf_llm.bench.display import to_rich
    from inf_llm.bench.prose_tasks import build_prose_prompt
    from inf_llm.bench.trace import steps_table, trace_case, trace_dialogue
    from inf_llm.generation.engine import Engine
    from inf_llm.memory.retrieval_trace import RetrievalTrace

    load_paragraphs()
    if not 0.0 <= args.depth <= 1.0:
        raise ValueError(f"--depth {args.depth} is invalid: a fraction in [0, 1]")
    model, tokenizer, _ = _load(args)
    args.methods, args.tag = "inf-llm", None
    (run,) = _runs(args, None if args.model_path is None else model.config.model_type)
    prompt = build_prose_prompt(tokenizer, args.task[0], args.length, args.depth, args.seed)
    engine = Engine(model, tokenizer, run.config, prefill_chunk=args.prefill_chunk)
    if args.dialogue:
        result = trace_dialogue(engine, prompt, args.min_new_tokens)
        turns = result["turns"]
        needles = [tuple(span) for span in turns[0]["needles"]]  # where the pasted document put them
    else:
        result = trace_case(engine, prompt, args.min_new_tokens)
        turns, needles = [result], prompt.needles
    asked = "a dialogue" if args.dialogue else "one message"
    console.print(f"{run.label}: {args.task[0]}, {len(prompt.ids)} tokens asked in {asked}, depth {args.depth:.0%}, "
                  f"seed {args.seed}")
    if args.dialogue:
        console.print(f"reply to the document: {escape(repr(result['paste_reply']))}")
    layout = RetrievalTrace(run.config.block_size, run.config.num_sink_tokens)  # position -> block arithmetic
    for (a, e), text in zip(needles, prompt.needle_texts):
        console.print(f"needle at tokens {a}-{e} (blocks {layout.blocks_of(a, e)}): {escape(text)}")
    # 30 layers' ranks make a wide table: in a log's 200 columns the step column would be folded away (a console
    # prints no wider than its own width).
    from rich.console import Console

    wide = Console(file=console.file, width=max(console.width, 260))
    for turn in turns:
        console.print(f"question: {escape(turn.get('question', prompt.question))}")
        console.print(f"expected {' '.join(turn['answers'])}; reply {escape(repr(turn['reply']))}; "
                      f"score {turn['score']:.2f}")
        wide.print(to_rich(steps_table(turn)))
        console.print(f"[bold]{turn['class']}[/bold]")


def cmd_speed(args, console) -> None:
    from inf_llm.bench.display import peak_table, speed_table, to_rich
    from inf_llm.bench.results import ResultLog
    from inf_llm.bench.speed import KIND, PEAK_KIND, SpeedPlan, run_speed

    model, tokenizer, model_id = _load(args)
    runs = _runs(args, None if args.model_path is None else model.config.model_type)
    plan = SpeedPlan(lengths=args.lengths, full_max_len=args.full_max_len, decode_tokens=args.decode_tokens,
                     prefill_chunk=args.prefill_chunk, peak_seconds=args.peak_seconds,
                     isolated=not args.in_process, device=_main_device(model, args), device_map=args.device_map)
    log = ResultLog(args.out / f"{args.name}.jsonl", fresh=args.fresh)
    try:
        run_speed(model, tokenizer, model_id, args.model_path, runs, plan, log, console)
    finally:
        peaks = log.records_of(PEAK_KIND)
        if peaks:
            console.print(to_rich(peak_table(peaks)))
        _finish(console, log, KIND, model_id, speed_table)


def cmd_gpu(args) -> None:
    # Plain print: this runs where rich may be missing.
    from inf_llm.bench.gpu import DEFAULT_LENGTHS, TINY_INF_LLM, TINY_LENGTHS, GpuPlan, gpu_table, run_gpu
    from inf_llm.bench.results import ResultLog
    from inf_llm.bench.table_data import to_text
    from inf_llm.config.files import load_config
    from inf_llm.config.presets import preset_path

    default = TINY_INF_LLM if args.tiny else load_config(preset_path("mistral-7b-instruct-inf-llm")).config
    runs = _runs(args, None, default_config=default)
    lengths = args.lengths or (TINY_LENGTHS if args.tiny else DEFAULT_LENGTHS)
    plan = GpuPlan(lengths=lengths, budget_s=args.budget_s, full_share=args.full_share,
                   decode_tokens=args.decode_tokens, prefill_chunk=args.prefill_chunk, tiny=args.tiny)
    # Each run measures from an empty memory in one pass, so there is nothing to resume: always a new file.
    log = ResultLog(args.out / f"{args.name}.jsonl", fresh=True)
    records = run_gpu(runs, plan, log, say=lambda text: print(text, flush=True))
    print(to_text(gpu_table(records)))
    print(f"results: {log.path}")
    try:
        from inf_llm.bench.plot import plot_gpu
    except ImportError as error:
        print(f"no plot: {error}; draw it on another machine with `python -m inf_llm.bench plot {log.path}`")
        return
    print(f"plot: {plot_gpu(records, log.path.with_suffix('.png'))}")


def cmd_long_read(args, console) -> None:
    from inf_llm.bench.display import make_progress
    from inf_llm.bench.million import PROGRESS_KIND, run_long_read
    from inf_llm.bench.results import ResultLog

    model, tokenizer, model_id = _load(args)
    args.methods, args.tag = "inf-llm", None
    (run,) = _runs(args, None if args.model_path is None else model.config.model_type)
    config = run.config.replace(host_cache_bytes=args.host_cache_bytes, disk_dir=args.disk_dir)
    log = ResultLog(args.out / f"{args.name}.jsonl", fresh=args.fresh)
    with make_progress(console) as progress:
        reading = progress.add_task("reading", total=1)

        def advance(done: int, total: int) -> None:
            progress.update(reading, completed=done, total=total)

        run_long_read(model, tokenizer, model_id, config, args.lengths, args.depths, log, one_needle=args.one_needle,
                      seed=args.seed, prefill_chunk=args.prefill_chunk, max_new_tokens=args.max_new_tokens,
                      every=args.every, keep_sessions=args.keep_sessions, say=progress.console.print,
                      on_tokens=advance, needle_oracle=args.needle_oracle)
    from inf_llm.bench.plot import plot_records

    for path in plot_records(log.records_of(PROGRESS_KIND), log.path.with_suffix(".png")):
        console.print(f"results: {log.path}   plot: {path}")


def cmd_table(args, console) -> None:
    from inf_llm.bench.display import long_read_table, passkey_table, peak_table, prose_table, speed_table, to_rich
    from inf_llm.bench.gpu import gpu_table
    from inf_llm.bench.results import read_records
    from inf_llm.bench.table_data import to_markdown

    if not args.file.is_file():
        raise FileNotFoundError(f"no result file {args.file}")
    records = read_records(args.file)
    builders = {"passkey": passkey_table, "prose": prose_table, "speed": speed_table, "matmul_peak": peak_table, "gpu": gpu_table,
                "long_read": long_read_table}
    tables = [build([r for r in records if r.get("kind") == kind]) for kind, build in builders.items()
              if any(r.get("kind") == kind for r in records)]
    if not tables:
        raise ValueError(f"{args.file} holds no passkey, prose, speed, gpu or long-read records")
    for table in tables:
        if args.markdown:
            print(to_markdown(table) + "\n")
        else:
            console.print(to_rich(table))


def cmd_plot(args, console) -> None:
    from inf_llm.bench.plot import plot_records
    from inf_llm.bench.results import read_records

    if not args.file.is_file():
        raise FileNotFoundError(f"no result file {args.file}")
    records = read_records(args.file)
    written = plot_records(records, args.png or args.file.with_suffix(".png"))
    if not written:
        raise ValueError(f"{args.file} holds no passkey, speed, gpu or long-read records to plot")
    for path in written:
        console.print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # a long run's log file shows each case as it finishes
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "loops":
            from inf_llm.bench.loops import run

            return run(args)
        if args.command == "gpu":
            cmd_gpu(args)
            return 0
        from rich.console import Console

        console = Console() if Console().is_terminal else Console(width=200)  # logs keep whole table rows
        {"passkey": cmd_passkey, "prose": cmd_prose, "trace": cmd_trace, "speed": cmd_speed, "long-read": cmd_long_read, "table": cmd_table, "plot": cmd_plot}[args.command](args, console)
    except KeyboardInterrupt:
        print("\nstopped; the finished cases are saved: run the same command again to continue", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
