"""Where the time goes on a GPU: torch's profiler over InfLLM reading and decoding at Mistral-7B's shapes.

    python -m inf_llm.bench.gpu_profile [--context 32768] [--chunks 2] [--decode 4] [--rows 30] [--set KEY=VALUE]
        [--method full]

Random bf16 weights on CUDA (as `python -m inf_llm.bench gpu`); the memory is first filled to --context tokens
unprofiled, then --chunks prefill calls of --prefill-chunk tokens and --decode single-token steps are profiled
separately (the Mistral preset, with --set's changes: `--set block_ranking=bounds` profiles another retrieval;
`--method full` profiles the full-attention baseline, `stream-llm` StreamingLLM). For each it prints the wall
time, the GPU-busy time (the sum of the kernels' times: a wall time far above it means the GPU waits for the host)
and the operators ranked by host time and by GPU time (with --stacks, also by Python call site). With --tiny it
runs a tiny Mistral on the CPU, to check the script.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from inf_llm.bench.gpu import TINY_INF_LLM, build_model
from inf_llm.bench.methods import method_runs, parse_overrides
from inf_llm.config.files import load_config
from inf_llm.config.presets import preset_path
from inf_llm.generation.engine import Engine


def _profiled(name: str, step, device: torch.device, rows: int, stacks: int = 0) -> None:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_stack=bool(stacks)) as prof:
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
    print(f"\n== {name}: wall {wall * 1e3:.1f} ms, kernels {gpu_us / 1e3:.1f} ms")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    if device.type == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))
    if stacks:
        # The Python call sites of the operators that take the host's time (the innermost `stacks` frames).
        by_site = prof.key_averages(group_by_stack_n=stacks)
        print(by_site.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60,
                            max_src_column_width=140))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768, help="tokens in the memory before profiling")
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--chunks", type=int, default=2, help="prefill calls profiled")
    parser.add_argument("--decode", type=int, default=4, help="decode steps profiled")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--stacks", type=int, default=0, metavar="N",
                        help="also rank the host's time by call site (the innermost N Python frames)")
    parser.add_argument("--method", default="inf-llm", choices=("inf-llm", "full", "stream-llm"))
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="change a setting of the preset, e.g. --set topk_blocks=32 (repeatable)")
    args = parser.parse_args(argv)

    if args.tiny:
        device, dtype, config = torch.device("cpu"), torch.float32, TINY_INF_LLM
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        config = load_config(preset_path("mistral-7b-instruct-inf-llm")).config
    # A baseline derived from the preset as the benchmarks derive it.
    (run,) = method_runs(config, (args.method,), parse_overrides(args.overrides))
    config = run.config
    model = build_model(args.tiny, device, dtype)
    engine = Engine(model, None, config, prefill_chunk=args.prefill_chunk)
    vocab = model.config.vocab_size
    ids = torch.randint(vocab, (args.context + args.chunks * args.prefill_chunk,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    with torch.inference_mode():
        logits = engine.feed(ids[: args.context])
    print(f"filled {args.context} tokens in {time.perf_counter() - start:.1f} s; config {config.to_dict()}")

    def read():
        with torch.inference_mode():
            for c in range(args.chunks):
                begin = args.context + c * args.prefill_chunk
                engine.feed(ids[begin : begin + args.prefill_chunk])

    def decode():
        nonlocal logits
        with torch.inference_mode():
            for _ in range(args.decode):
                logits = engine.feed([int(logits.argmax())])

    _profiled(f"{args.chunks} prefill calls of {args.prefill_chunk} tokens", read, device, args.rows, args.stacks)
    with torch.inference_mode():
        logits = engine.feed([int(logits.argmax())])  # one unprofiled step: decode's first-call costs out
    _profiled(f"{args.decode} decode steps", decode, device, args.rows, args.stacks)


if __name__ == "__main__":
    main()
