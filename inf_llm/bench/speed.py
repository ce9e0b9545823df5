"""The speed benchmark: prefill rate, decode latency and memory growth vs context length, for each method.

One case = one method at one length: feed `length` tokens of the passkey filler into an empty memory (timed:
prefill tokens/s), then decode `decode_tokens` greedy tokens one at a time (mean ms/token), sampling the
process's resident memory (RSS) before, during and after. RSS growth is compared with the 16-bit KV size of the
tokens read (issue 5's memory target); the memory's own byte counts (host / device) are recorded next to it.

By default each case runs in a fresh process (`spawn`), so that memory freed by an earlier case but kept by the
allocator cannot hide a later case's growth; `isolated=False` runs in this process (for tests and quick looks).
The float32 matmul peak is measured in the parent with no case running: at the start, before each case and at
the end. A measurement disturbed by other work reads low, so each record's efficiency divides by the best peak
measured so far in its run, and tables divide by the best of the whole run (`run` names it): the larger the
peak, the lower (more conservative) the efficiency.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import queue
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import psutil
import torch

from inf_llm.bench.flops import kv_bytes_per_token, matmul_peak, mlp_shape, prefill_flops
from inf_llm.bench.methods import MethodRun
from inf_llm.bench.prompt import build_passkey_prompt
from inf_llm.bench.results import ResultLog, machine_info
from inf_llm.config.schema import InfLLMConfig
from inf_llm.generation.engine import Engine

logger = logging.getLogger(__name__)

KIND = "speed"
PEAK_KIND = "matmul_peak"
_WARMUP_TOKENS = 32


@dataclass(frozen=True)
class SpeedPlan:
    lengths: tuple[int, ...]
    full_max_len: int
    decode_tokens: int = 16
    prefill_chunk: int = 2048
    peak_seconds: float = 2.0
    isolated: bool = True
    device: str = "cpu"
    device_map: str | None = None  # accelerate's, for a model spread over several devices


def _rss() -> int:
    return psutil.Process().memory_info().rss


def measure_speed(model, tokenizer, config: InfLLMConfig, ids: list[int], *, decode_tokens: int, prefill_chunk: int,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Prefill `ids` into a fresh engine, then decode; timings and memory of this process."""
    engine = Engine(model, tokenizer, config, prefill_chunk=prefill_chunk)
    # Warm up (lazy initialisation, thread pools, first-call allocations) outside the timed region.
    engine.feed(ids[:_WARMUP_TOKENS])
    engine.reset()
    gc.collect()
    rss_base = rss_peak = _rss()
    device = engine.device

    def on_chunk(done: int, total: int) -> None:
        nonlocal rss_peak
        rss_peak = max(rss_peak, _rss())
        if progress is not None:
            progress(done, total)

    start = time.perf_counter()
    logits = engine.feed(ids, progress=on_chunk)
    _sync(device)
    prefill_s = time.perf_counter() - start
    rss_prefill = _rss()
    before = engine.stats()
    step_ms = []
    for _ in range(decode_tokens):
        token = int(logits.argmax())
        start = time.perf_counter()
        logits = engine.feed([token])
        _sync(device)
        step_ms.append(1000 * (time.perf_counter() - start))
    rss_end = _rss()
    rss_peak = max(rss_peak, rss_prefill, rss_end)
    stats = engine.stats()
    decode_hits, decode_misses = stats.cache_hits - before.cache_hits, stats.cache_misses - before.cache_misses
    return {
        "decode_cache_hits": decode_hits,
        "decode_cache_misses": decode_misses,
        "decode_scoring_ms": _scoring_ms(engine, decode_tokens),
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": len(ids) / prefill_s,
        "decode_ms_per_token": statistics.fmean(step_ms) if step_ms else None,
        "decode_ms_median": statistics.median(step_ms) if step_ms else None,
        "decode_ms_min": min(step_ms) if step_ms else None,
        "rss_base_bytes": rss_base,
        "rss_growth_bytes": rss_end - rss_base,
        "rss_growth_after_prefill_bytes": rss_prefill - rss_base,
        "rss_peak_growth_bytes": rss_peak - rss_base,
        "memory": {field: getattr(stats, field) for field in stats.__dataclass_fields__},
    }


def _scoring_ms(engine: Engine, repeats: int) -> float | None:
    """What ranking the blocks costs a decoded token, all layers (the part of decode that reads every
    representative): block scoring alone, as a decode step calls it, timed on the memory as it is now."""
    from inf_llm.memory.ranking import block_scores, ranking_query

    layers = getattr(engine.memory, "layers", None)
    if not layers or engine.config.method != "inf-llm" or repeats < 1:
        return None
    shape = layers[0].shape
    query = torch.randn(shape.num_heads, 1, shape.head_dim, device=engine.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for layer in layers:
            if layer.blocks.num_blocks:
                ranked = ranking_query(query.to(layer.device), layer.config.block_ranking, shape.num_kv_heads)
                block_scores(layer.reprs, ranked, shape.num_kv_heads, layer.config.per_head_ranking,
                             layer._repr_absmax)
        _sync(engine.device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- one case in a fresh process ----------------------------------------------------------------------------


def _child_main(spec: dict[str, Any], messages) -> None:
    """Entry point of a case's process: load the model, measure, send ("result", dict) or ("error", text)."""
    try:
        from inf_llm.model.loading import load_model

        torch.set_num_threads(spec["threads"])
        if spec.get("device_map") is not None:
            model, tokenizer = load_model(spec["model_path"], device=None, device_map=spec["device_map"])
        else:
            model, tokenizer = load_model(spec["model_path"], device=spec["device"])
        config = InfLLMConfig(**spec["config"])

        def progress(done: int, total: int) -> None:
            messages.put(("progress", done, total))

        result = measure_speed(model, tokenizer, config, spec["ids"], decode_tokens=spec["decode_tokens"],
                               prefill_chunk=spec["prefill_chunk"], progress=progress)
        messages.put(("result", result))
    except BaseException:  # noqa: BLE001 - everything, KeyboardInterrupt included, goes back to the parent
        messages.put(("error", traceback.format_exc()))


def measure_isolated(spec: dict[str, Any], progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run `_child_main(spec)` in a fresh spawned process and return its result; its error becomes ours."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    process = context.Process(target=_child_main, args=(spec, messages), daemon=True)
    process.start()
    try:
        while True:
            try:
                message = messages.get(timeout=1.0)
            except queue.Empty:
                if not process.is_alive():
                    raise RuntimeError(f"the benchmark process died (exit code {process.exitcode}) before reporting; "
                                       "out of memory?") from None
                continue
            if message[0] == "progress":
                if progress is not None:
                    progress(message[1], message[2])
            elif message[0] == "result":
                return message[1]
            else:
                raise RuntimeError(f"the benchmark process failed:\n{message[1]}")
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()
            process.join()


# --- the run ------------------------------------------------------------------------------------------------


def filler_ids(tokenizer, length: int) -> list[int]:
    """`length` tokens of realistic input: the start of a passkey prompt (key at half depth, seed 0)."""
    # The prompt lands within a filler sentence of the length asked for; the margin makes it long enough.
    ids = build_passkey_prompt(tokenizer, length + 64, 0.5, 0).ids
    if len(ids) < length:
        raise AssertionError(f"the filler prompt has {len(ids)} tokens, fewer than {length}")
    return ids[:length]


def measure_peak(model, plan: SpeedPlan, log: ResultLog, run_id: str, when: str) -> dict[str, Any]:
    m, k, n = mlp_shape(model.config, plan.prefill_chunk)
    dtype = model.get_input_embeddings().weight.dtype
    peak = matmul_peak(m, k, n, seconds=plan.peak_seconds, dtype=dtype, device=plan.device)
    return log.append(PEAK_KIND, {"run": run_id, "when": when}, machine=machine_info(), **peak)


def run_speed(model, tokenizer, model_id: str, model_path: str | None, runs: list[MethodRun], plan: SpeedPlan,
              log: ResultLog, console=None) -> list[dict[str, Any]]:
    """Measure every (method, length) case not yet in `log`; return the new records."""
    from inf_llm.bench.display import make_progress

    cases = [(length, run) for length in sorted(plan.lengths) for run in runs
             if not (run.method == "full" and length > plan.full_max_len)]

    def case_key(length: int, run: MethodRun) -> dict[str, Any]:
        return {"model": model_id, "settings": run.identity(), "length": length, "device": plan.device,
                "decode_tokens": plan.decode_tokens, "prefill_chunk": plan.prefill_chunk, "isolated": plan.isolated}

    pending = [(length, run) for length, run in cases if not log.done(KIND, case_key(length, run))]
    if not pending:
        return []
    run_id = time.strftime("%Y%m%dT%H%M%S")
    best_peak = measure_peak(model, plan, log, run_id, "start")["gflops"]
    ids = filler_ids(tokenizer, max(length for length, _ in pending))
    kv16 = kv_bytes_per_token(model.config)
    machine = machine_info()
    new = []
    with make_progress(console) as progress:
        overall = progress.add_task("speed cases", total=len(pending))
        reading = progress.add_task("reading", total=1, visible=False)
        for length, run in pending:
            description = f"{run.label} {length} tokens"
            if (length, run) != pending[0]:
                best_peak = max(best_peak, measure_peak(model, plan, log, run_id, f"before {run.label} {length}")["gflops"])
            progress.update(reading, description=description, completed=0, total=length, visible=True)

            def advance(done: int, total: int) -> None:
                progress.update(reading, completed=done, total=total)

            if plan.isolated:
                spec = {"model_path": model_path, "device": plan.device, "device_map": plan.device_map,
                        "config": run.config.to_dict(),
                        "ids": ids[:length], "decode_tokens": plan.decode_tokens,
                        "prefill_chunk": plan.prefill_chunk, "threads": torch.get_num_threads()}
                result = measure_isolated(spec, advance)
            else:
                gc.collect()
                result = measure_speed(model, tokenizer, run.config, ids[:length], decode_tokens=plan.decode_tokens,
                                       prefill_chunk=plan.prefill_chunk, progress=advance)
            flops = prefill_flops(model, run.config, length, plan.prefill_chunk)
            record = log.append(
                KIND, case_key(length, run), label=run.label, config=run.config.to_dict(), machine=machine,
                **result,
                rss_growth_per_token=result["rss_growth_bytes"] / length,
                kv16_bytes_per_token=kv16,
                flops=flops,
                run=run_id,
                peak_gflops=best_peak,
                efficiency=flops["total"] / result["prefill_s"] / (best_peak * 1e9),
            )
            new.append(record)
            progress.console.print(
                f"{description}: prefill {result['prefill_tokens_per_s']:.0f} tokens/s, decode "
                f"{result['decode_ms_per_token'] or float('nan'):.1f} ms/token, "
                f"RSS +{result['rss_growth_bytes'] / 2**20:.0f} MiB")
            progress.advance(overall)
        progress.update(reading, visible=False)
    measure_peak(model, plan, log, run_id, "end")
    return new
