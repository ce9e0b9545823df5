"""The GPU benchmark: a random-weight model of Mistral-7B's shapes, from 32K tokens toward 1M, in 8 minutes.

Speed and memory do not depend on the weights, so the model is built from a `MistralConfig` of Mistral-7B's
shapes with random bf16 weights directly on the GPU (nothing is downloaded; the GPU machines have no weights and
no registry). For each method (inf-llm with the Mistral preset, full attention with sdpa) it reads random tokens
into one memory, growing it through the lengths (32K, 128K, 256K, 512K, 1M by default), and at each length
records the cumulative prefill time, the decode ms/token (a few greedy tokens, which stay in the memory: the next
segment reads that many fewer tokens, so that the memory holds exactly `length` tokens at every checkpoint) and
the peak GPU memory (`max_memory_allocated`).

Time is budgeted, counted from the process's start: full attention gets a share, inf-llm the rest. Before each
segment its time is estimated from the previous one (linear in tokens for the windowed methods, quadratic for full
attention); a segment that would not fit is skipped and recorded as such, and a segment that overruns is stopped
at its next chunk. Running out of GPU memory (full attention will) or of host memory for the offloaded blocks is
recorded too, and so is any other error (with its traceback), after which the next method still runs. The table
is plain text and the plot optional because the GPU machine has neither rich nor (necessarily) matplotlib;
`python -m inf_llm.bench plot <file>` draws it later.

`tiny=True` runs the same logic with a tiny Mistral on the CPU in float32, for tests.
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil
import torch

from inf_llm.bench.flops import kv_bytes_per_token
from inf_llm.bench.methods import MethodRun
from inf_llm.bench.results import ResultLog, machine_info
from inf_llm.bench.table_data import TableData, format_length
from inf_llm.config.schema import InfLLMConfig
from inf_llm.generation.engine import Engine

logger = logging.getLogger(__name__)

KIND = "gpu"
MISTRAL_7B_SHAPES = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=32000)
TINY_SHAPES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=256)
ROPE_THETA = 1e6
# The Mistral preset's structure at a tiny scale, so that --tiny exercises blocks, retrieval and the cache.
TINY_INF_LLM = InfLLMConfig(num_sink_tokens=16, local_window=128, block_size=32, repr_tokens=4, topk_blocks=4,
                            chunk_size=64, device_cache_blocks=8)
DEFAULT_LENGTHS = (32768, 131072, 262144, 524288, 1048576)
TINY_LENGTHS = (256, 1024, 2048)


class BudgetExceeded(Exception):
    """A segment ran past its method's deadline (raised from the prefill progress callback)."""


@dataclass(frozen=True)
class GpuPlan:
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    budget_s: float = 420.0  # from process start, leaving margin under the 8-minute limit
    full_share: float = 0.4  # of the time left when full attention starts
    decode_tokens: int = 8
    prefill_chunk: int = 4096
    host_memory_fraction: float = 0.8  # of the available RAM the offloaded blocks may take
    tiny: bool = False
    seed: int = 0
    started: float = field(default_factory=lambda: psutil.Process().create_time())  # wall clock (time.time())


def model_config(tiny: bool):
    from transformers import MistralConfig

    shapes = TINY_SHAPES if tiny else MISTRAL_7B_SHAPES
    # No sliding window: full attention must attend everything (Mistral-7B-v0.2 has none either).
    return MistralConfig(**shapes, sliding_window=None, max_position_embeddings=1 << 21,
                         rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights allocated (and initialised) directly on `device`: no host copy of 14 GB."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(tiny), dtype=dtype)
    model.eval().requires_grad_(False)
    wrong = {str(p.device) for p in model.parameters() if p.device.type != device.type}
    if wrong:
        raise RuntimeError(f"the random model was built on {wrong}, not {device}")
    return model


def estimate_segment_s(prev: tuple[int, int, float] | None, start: int, end: int, quadratic: bool) -> float | None:
    """Seconds to read tokens start..end, from the previous segment (prev_start, prev_end, seconds).

    Linear methods cost the same per token; full attention's cost per token grows with the context, which the
    quadratic estimate (cost ~ context) overstates slightly: it errs on the side of finishing in time.
    """
    if prev is None:
        return None
    prev_start, prev_end, seconds = prev
    if quadratic:
        return seconds * (end**2 - start**2) / max(prev_end**2 - prev_start**2, 1)
    return seconds * (end - start) / max(prev_end - prev_start, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gpu(device: torch.device) -> tuple[int | None, int | None]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)


def _read(engine: Engine, ids: list[int], progress, device: torch.device) -> tuple[float, torch.Tensor]:
    """Feed ids; (seconds, logits after the last one)."""
    expected = engine.memory.num_tokens + len(ids)
    start = time.perf_counter()
    logits = engine.feed(ids, progress=progress)
    _sync(device)
    seconds = time.perf_counter() - start
    if engine.memory.num_tokens != expected:
        raise AssertionError(f"the memory holds {engine.memory.num_tokens} tokens, expected {expected}")
    return seconds, logits


def _decode(engine: Engine, logits: torch.Tensor, tokens: int, device: torch.device) -> list[float]:
    """Greedy decode; ms per token. The tokens stay in the memory (the caller accounts for them)."""
    step_ms = []
    for _ in range(tokens):
        token = int(logits.argmax())
        start = time.perf_counter()
        logits = engine.feed([token])
        _sync(device)
        step_ms.append(1000 * (time.perf_counter() - start))
    return step_ms


def run_method(model, run: MethodRun, ids: torch.Tensor, plan: GpuPlan, deadline: float, log: ResultLog,
               run_id: str, model_id: str, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Grow one memory through plan.lengths; one record per length (ok, or why it stopped)."""
    device = model.get_input_embeddings().weight.device
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    host_per_token = kv_bytes_per_token(model.config, 2) if run.method != "full" else 0
    records: list[dict[str, Any]] = []
    fed, prefill_s, prev = 0, 0.0, None  # fed: prompt ids read so far (the memory also holds the decoded tokens)

    def record(length: int, status: str, **fields: Any) -> None:
        case = {"model": model_id, "settings": run.identity(), "length": length, "run": run_id}
        records.append(log.append(KIND, case, label=run.label, config=run.config.to_dict(), status=status,
                                  **fields))
        say(f"{run.label} {length} tokens: {status}")

    def check_deadline(done: int, total: int) -> None:
        if time.time() > deadline:
            raise BudgetExceeded(f"{done} of {total} tokens read when the time budget ran out")

    engine = None
    try:
        try:
            engine = Engine(model, None, run.config, prefill_chunk=plan.prefill_chunk)
        except Exception as error:  # noqa: BLE001 - e.g. a kernel backend that cannot start: recorded and shown
            record(min(plan.lengths), f"error: {type(error).__name__}: {error}", traceback=traceback.format_exc())
            return records
        for length in sorted(plan.lengths):
            remaining = deadline - time.time()
            held = engine.memory.num_tokens
            estimate = estimate_segment_s(prev, held, length, quadratic=run.method == "full")
            if estimate is not None and estimate > remaining:
                record(length, "skipped: time budget", estimated_s=estimate, remaining_s=remaining)
                break
            need = 2 * (length - held) * host_per_token  # x2: the host store grows by doubling
            available = psutil.virtual_memory().available
            if need > plan.host_memory_fraction * available:
                record(length, "skipped: host memory", host_bytes_needed=need, host_bytes_available=available)
                break
            count = length - held
            try:
                seconds, logits = _read(engine, ids[fed : fed + count].tolist(), check_deadline, device)
                step_ms = _decode(engine, logits, plan.decode_tokens, device)
            except torch.OutOfMemoryError as error:
                record(length, "out of GPU memory", error=str(error).splitlines()[0])
                break
            except BudgetExceeded as error:
                record(length, "stopped: time budget", error=str(error))
                break
            except Exception as error:  # noqa: BLE001 - recorded and shown; the other methods still run
                logger.exception("%s failed at %d tokens", run.label, length)
                record(length, f"error: {type(error).__name__}: {error}", traceback=traceback.format_exc())
                break
            prev, fed, prefill_s = (held, length, seconds), fed + count, prefill_s + seconds
            peak, allocated = _peak_gpu(device)
            stats = engine.stats()
            record(length, "ok", prefill_s=prefill_s, prefill_tokens_per_s=fed / prefill_s, segment_s=seconds,
                   decode_ms_per_token=sum(step_ms) / len(step_ms) if step_ms else None,
                   peak_gpu_bytes=peak, gpu_allocated_bytes=allocated, rss_bytes=psutil.Process().memory_info().rss,
                   memory={name: getattr(stats, name) for name in stats.__dataclass_fields__})
    finally:
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def gpu_table(records: list[dict[str, Any]]) -> TableData:
    gib = 2**30
    rows = []
    for r in records:
        ok = r["status"] == "ok"
        rows.append((
            r["label"], format_length(r["case"]["length"]), r["status"],
            f"{r['prefill_s']:.1f}" if ok else "-", f"{r['prefill_tokens_per_s']:.0f}" if ok else "-",
            f"{r['decode_ms_per_token']:.1f}" if ok and r["decode_ms_per_token"] is not None else "-",
            f"{r['peak_gpu_bytes'] / gib:.1f}" if ok and r["peak_gpu_bytes"] is not None else "-",
            f"{r['memory']['host_bytes'] / gib:.2f}" if ok else "-",
        ))
    model = records[0]["case"]["model"] if records else ""
    return TableData(f"{model}: prefill (cumulative), decode and peak GPU memory vs context length",
                     ("method", "tokens", "status", "prefill s", "tok/s", "decode ms", "peak GiB", "host GiB"),
                     tuple(rows), left_columns=3)


def run_gpu(runs: list[MethodRun], plan: GpuPlan, log: ResultLog, say: Callable[[str], None] = print) -> list[dict]:
    """Build the model, then run each method in turn (full attention first, with its share of the time)."""
    if plan.tiny:
        device, dtype, model_id = torch.device("cpu"), torch.float32, "tiny-mistral (random float32)"
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("the gpu benchmark needs a CUDA GPU, and torch.cuda.is_available() is False here; "
                               "run it on a GPU machine (or pass --tiny to exercise it on the CPU at tiny sizes)")
        device, dtype, model_id = torch.device("cuda"), torch.bfloat16, "mistral-7b shapes (random bf16)"
    end = plan.started + plan.budget_s
    start = time.perf_counter()
    model = build_model(plan.tiny, device, dtype)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    say(f"built {model_id} on {device} in {time.perf_counter() - start:.1f} s "
        f"({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {weights_bytes / 2**30:.1f} GiB); "
        f"{end - time.time():.0f} s of the budget left")
    generator = torch.Generator().manual_seed(plan.seed)
    ids = torch.randint(model.config.vocab_size, (max(plan.lengths),), generator=generator)
    run_id = time.strftime("%Y%m%dT%H%M%S")
    log.append("gpu_run", {"run": run_id}, machine=machine_info(), model=model_id, weights_bytes=weights_bytes, plan={
        "lengths": list(plan.lengths), "budget_s": plan.budget_s, "full_share": plan.full_share,
        "decode_tokens": plan.decode_tokens, "prefill_chunk": plan.prefill_chunk})
    records = []
    ordered = sorted(runs, key=lambda r: r.method != "full")
    for index, run in enumerate(ordered):
        left = end - time.time()
        later = len(ordered) - index - 1
        share = plan.full_share if run.method == "full" and later else 1.0 / (later + 1)
        deadline = time.time() + share * left
        say(f"{run.label}: {share * left:.0f} s budget")
        records += run_method(model, run, ids, plan, deadline, log, run_id, model_id, say)
    return records
