"""Where a decoding step's time goes on a long memory: the long read's document, read once into a saved session
(or resumed from it), then one question decoded with a time per step, the block store's counters and, with
--profile, Python's profiler.

    python -m inf_llm.bench.decode_profile --session FOLDER [--tokens 64K] [--depth 0.5] [--host-cache-bytes 128M]
        [--decode 16] [--set KEY=VALUE ...] [--profile 30] [--drop-page-cache]

FOLDER is created by the first run (the document read and saved there: minutes to hours) and resumed by the next
ones, which may change what a saved memory does not depend on (the second stage, the ranking codes, the RAM
budget: `--set rerank_reads_disk=false`). A long read's kept session (`long-read --keep-sessions`) is such a
folder. --drop-page-cache empties the OS page cache first (Linux, as root), so that blocks on disk are read cold,
as when a user resumes a saved chat. The embedded model, its preset, one thread.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from pathlib import Path

import psutil
import torch

from inf_llm.bench.__main__ import parse_bytes, parse_length
from inf_llm.bench.methods import parse_overrides
from inf_llm.bench.million import build_document, question_ids
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from inf_llm.sessions.state_file import STATE_FILE
from inf_llm.sessions.store import resume_session, save_session

COUNTERS = ("hits", "misses", "disk_reads")


def counters(engine: Engine) -> dict[str, int]:
    """The block stores' counters summed over the layers: device-cache hits and misses, blocks read from disk."""
    return {name: sum(getattr(layer.blocks, name) for layer in engine.memory.layers) for name in COUNTERS}


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as handle:
        handle.write("1\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--session", type=Path, required=True, help="the saved read (created when missing)")
    parser.add_argument("--tokens", type=parse_length, default=parse_length("64K"))
    parser.add_argument("--depth", type=float, default=0.5, help="where the document's needle sits")
    parser.add_argument("--host-cache-bytes", type=parse_bytes, default=None)
    parser.add_argument("--decode", type=int, default=16, help="tokens decoded at most")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print the profiler's top ROWS")
    parser.add_argument("--drop-page-cache", action="store_true")
    args = parser.parse_args(argv)
    from inf_llm.model.loading import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model(None, device="cpu")
    config = load_config(default_preset_for(None)).config.replace(host_cache_bytes=args.host_cache_bytes,
                                                                  **parse_overrides(args.overrides))
    doc = build_document(tokenizer, args.tokens, (args.depth,), 0)
    engine = Engine(model, tokenizer, config)
    chat = {"long_read": doc.fingerprint}
    if args.drop_page_cache:
        drop_page_cache()
    start = time.perf_counter()
    if (args.session / STATE_FILE).exists():
        resume_session(args.session, engine, chat)
        if engine.tokens != doc.ids:
            raise SystemExit(f"{args.session} does not hold this document ({len(engine.tokens)} tokens)")
        print(f"resumed {len(engine.tokens):,} tokens in {time.perf_counter() - start:.1f} s", flush=True)
    else:
        engine.feed(doc.ids)
        print(f"read {len(engine.tokens):,} tokens in {time.perf_counter() - start:.0f} s", flush=True)
        save_session(args.session, engine, [], chat)
    layer = engine.memory.layers[0]
    print(f"per layer: {layer.blocks.num_blocks:,} blocks, {layer.blocks.host_blocks():,} in RAM, "
          f"{layer.blocks.disk_blocks():,} on disk")
    before, steps, text = counters(engine), [], ""
    profiler = cProfile.Profile() if args.profile else None
    params = SamplingParams(temperature=0.0, max_new_tokens=args.decode)
    last = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    first = None  # the counters once the first step (the question read, the reply's first token) is done
    for step in engine.generate(question_ids(tokenizer, doc.needles[0].word), params):
        now = time.perf_counter()
        steps.append(now - last)
        if first is None:
            first = counters(engine)
        last = now
        text += step.text
    if profiler is not None:
        profiler.disable()
    after = counters(engine)
    needle = doc.needles[0]
    print(f"reply {text!r} (the number: {needle.value})")
    print("seconds per step (the first reads the question):", " ".join(f"{s:.3f}" for s in steps))
    later = steps[1:] or steps
    print(f"decode {sum(later) / len(later) * 1e3:.0f} ms per token after the first step; first step {steps[0]:.2f} s")
    print("per step, all layers: " + ", ".join(f"{name} {(after[name] - before[name]) / len(steps):.0f}"
                                              for name in COUNTERS))
    if len(steps) > 1:  # a decoding step's own loads, without the question's
        print("per step after the first: " + ", ".join(
            f"{name} {(after[name] - first[name]) / (len(steps) - 1):.0f}" for name in COUNTERS))
    print(f"RSS {psutil.Process().memory_info().rss / 2**30:.2f} GiB")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
