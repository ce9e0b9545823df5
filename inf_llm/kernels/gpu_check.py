"""GPU check of the Triton attention kernels: correctness at real shapes, and speed next to torch's SDPA.

Run on a CUDA machine (no weights, no downloads; random tensors of real shapes):

    python -m inf_llm.kernels.gpu_check            # about 1-2 minutes on an H100
    python -m inf_llm.kernels.gpu_check --json results.json

Correctness: every kernel (`attend` under each mask, `key_mass`, `merge`) against `reference.py` at head_dim 64
and 128, grouped heads 4:1 (Mistral's 32/8) and 8:1 (32/4), Tq 1 (decode) and 512 (a prefill chunk), Tk 4K to
32K, bfloat16 and float16. Speed: `attend` next to `torch.nn.functional.scaled_dot_product_attention` over the
same number of visible keys (the whole Tk for mask "none"; the window for "band", whose other keys the kernel
must skip), plus `key_mass` and `merge` next to the reference. The overlap of retrieval with compute: one layer's
memory (Mistral-7B's shapes, its preset's window and blocks, a device cache that must evict every chunk) fed a
stream of prefill chunks, staged with the host-to-device block copies on a side stream, against the serial
schedule on one stream (`LayerMemory.overlap`): the outputs must be equal (a slot read before its copy lands, or
overwritten before its last read, would differ), and the time per chunk of each is reported. Exits 1 if any comparison fails.

Without a GPU, ``TRITON_INTERPRET=1 python -m inf_llm.kernels.gpu_check --tiny`` runs the same code paths on
CPU at toy shapes in float16/float32 (the interpreter gets bfloat16 wrong), to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from inf_llm.config.schema import InfLLMConfig
from inf_llm.kernels import reference, resolve_ops

# Tolerances against the float32 reference. The kernels round the probabilities to the input dtype before the
# P @ V product (as flash attention does), so bfloat16 (8 mantissa bits) gets the loosest bound.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 2e-5}


@dataclass(frozen=True)
class Shape:
    hq: int
    hkv: int
    tq: int
    tk: int
    d: int
    window: int  # for band/complement; "none"/"causal" ignore it


@dataclass
class CheckRow:
    what: str
    shape: str
    dtype: str
    max_err: float
    tol: float
    ok: bool


@dataclass
class TimeRow:
    what: str
    shape: str
    dtype: str
    triton_ms: float
    baseline: str
    baseline_ms: float


def _shapes(tiny: bool) -> list[Shape]:
    if tiny:
        return [Shape(8, 2, tq, tk, 32, 48) for tq in (1, 20) for tk in (64, 130)] + [Shape(8, 1, 1, 100, 64, 40)]
    shapes = []
    for d in (64, 128):
        for hq, hkv in ((32, 8), (32, 4)):
            for tq, tks in ((1, (4096, 16384, 32768)), (512, (4096, 32768))):
                shapes += [Shape(hq, hkv, tq, tk, d, 2048) for tk in tks]
    return shapes


def _timing_shapes(tiny: bool) -> list[Shape]:
    if tiny:
        return [Shape(8, 2, 1, 130, 32, 48), Shape(8, 2, 20, 130, 32, 48)]
    return [Shape(32, 8, tq, tk, d, 4096) for d in (64, 128) for tq in (1, 512) for tk in (4096, 16384, 32768)]


def _label(s: Shape) -> str:
    return f"Hq{s.hq}/Hkv{s.hkv} Tq{s.tq} Tk{s.tk} D{s.d} w{s.window}"


def _inputs(s: Shape, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, s.hq, s.tq, s.d, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, s.hkv, s.tk, s.d, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, s.hkv, s.tk, s.d, device=device, dtype=dtype, generator=g)
    return q, k, v


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| / (1 + |want|) over finite entries; inf if the non-finite entries differ."""
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)) or not torch.equal(got[~finite], want[~finite]):
        return math.inf
    if not finite.any():
        return 0.0
    return ((got[finite] - want[finite]).abs() / (1 + want[finite].abs())).max().item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall time of ``fn`` in milliseconds after two warm-up calls (compilation included there)."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def check_correctness(ops, shapes: list[Shape], dtypes: list[torch.dtype], device: torch.device) -> list[CheckRow]:
    rows = []
    for n, s in enumerate(shapes):
        for dtype in dtypes:
            q, k, v = _inputs(s, dtype, device, seed=n)
            scale = 1 / math.sqrt(s.d)
            q_offset = s.tk - s.tq  # the chunk sits at the end of its keys, as in InfLLM's local stage
            tol = TOLERANCE[dtype]
            results = {}
            for mask in reference.MASKS:
                kw = dict(mask=mask, q_offset=q_offset, window=s.window)
                want = reference.attend(q, k, v, scale, **kw)
                got = ops.attend(q, k, v, scale, **kw)
                results[mask] = got
                err = max(_max_err(got[0], want[0]), _max_err(got[1], want[1]))
                rows.append(CheckRow(f"attend {mask}", _label(s), str(dtype), err, tol, err <= tol))
                del want
            # key_mass normalised by the merged band + complement lse, as the memory update uses it.
            _, lse = reference.merge(*results["band"], *results["complement"])
            kw = dict(mask="band", q_offset=q_offset, window=s.window)
            want = reference.key_mass(q, k, scale, lse, **kw)
            got = ops.key_mass(q, k, scale, lse, **kw)
            # Masses are sums over up to Tq probabilities: compare relative to the total mass.
            err = _max_err(got / max(1, s.tq), want / max(1, s.tq))
            rows.append(CheckRow("key_mass band", _label(s), str(dtype), err, tol, err <= tol))
            want = reference.merge(*results["band"], *results["complement"])
            got = ops.merge(*results["band"], *results["complement"])
            err = max(_max_err(got[0], want[0]), _max_err(got[1], want[1]))
            tol32 = TOLERANCE[torch.float32]  # merge reads float32 partials whatever the input dtype
            rows.append(CheckRow("merge", _label(s), str(dtype), err, tol32, err <= tol32))
            del q, k, v, results, want, got
    return rows


def check_speed(ops, shapes: list[Shape], dtype: torch.dtype, device: torch.device, reps: int) -> list[TimeRow]:
    rows = []
    for n, s in enumerate(shapes):
        q, k, v = _inputs(s, dtype, device, seed=100 + n)
        scale = 1 / math.sqrt(s.d)
        q_offset = s.tk - s.tq
        group = s.hq // s.hkv
        # SDPA gets its keys already expanded to the query heads (outside the timing), so that its fastest
        # (flash) path applies; the Triton kernel reads the grouped keys directly.
        k_all, v_all = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        visible = s.window + s.tq - 1  # keys the band of the whole chunk covers
        k_win, v_win = k_all[:, :, -visible:].contiguous(), v_all[:, :, -visible:].contiguous()
        label = _label(s)
        t_none = _time_ms(lambda: ops.attend(q, k, v, scale, mask="none"), device, reps)
        t_sdpa = _time_ms(lambda: F.scaled_dot_product_attention(q, k_all, v_all, scale=scale), device, reps)
        rows.append(TimeRow("attend none", label, str(dtype), t_none, f"sdpa {s.tk} keys", t_sdpa))
        band = dict(mask="band", q_offset=q_offset, window=s.window)
        t_band = _time_ms(lambda: ops.attend(q, k, v, scale, **band), device, reps)
        # SDPA over the keys the band covers; for Tq > 1 it attends to all of them (no band mask), a lower bound.
        t_sdpa_w = _time_ms(lambda: F.scaled_dot_product_attention(q, k_win, v_win, scale=scale), device, reps)
        rows.append(TimeRow("attend band", label, str(dtype), t_band, f"sdpa {visible} keys", t_sdpa_w))
        out, lse = ops.attend(q, k, v, scale, mask="causal", q_offset=q_offset)
        kw = dict(mask="band", q_offset=q_offset, window=s.window)
        t_mass = _time_ms(lambda: ops.key_mass(q, k, scale, lse, **kw), device, reps)
        t_mass_ref = _time_ms(lambda: reference.key_mass(q, k, scale, lse, **kw), device, max(1, reps // 4))
        rows.append(TimeRow("key_mass band", label, str(dtype), t_mass, "torch reference", t_mass_ref))
        t_merge = _time_ms(lambda: ops.merge(out, lse, out, lse), device, reps)
        t_merge_ref = _time_ms(lambda: reference.merge(out, lse, out, lse), device, reps)
        rows.append(TimeRow("merge", label, str(dtype), t_merge, "torch reference", t_merge_ref))
        del q, k, v, k_all, v_all, k_win, v_win, out, lse
    return rows


def _layer_memory(ops, config: InfLLMConfig, hq: int, hkv: int, d: int, dtype: torch.dtype,
                  device: torch.device, overlap: bool):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from inf_llm.memory.layer_memory import LayerMemory
    from inf_llm.memory.layer_state import LayerShape
    from inf_llm.model.rope import RotaryTable

    rotary_emb = LlamaRotaryEmbedding(LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, head_dim=d)).to(device)
    positions = config.local_window + config.chunk_size + config.num_sink_tokens + 1
    rotary = RotaryTable(rotary_emb, d, positions, device)
    return LayerMemory(config, LayerShape(hq, hkv, d), rotary, ops, dtype=dtype, storage_dtype=torch.float16,
                       device=device, overlap=overlap)


def check_overlap(ops, dtype: torch.dtype, device: torch.device, tiny: bool) -> tuple[list[CheckRow], list[TimeRow]]:
    """One layer's memory with and without the staged, side-stream schedule: equal outputs, time per chunk."""
    if tiny:
        hq, hkv, d, chunks = 8, 2, 32, 12
        config = InfLLMConfig(num_sink_tokens=8, local_window=32, block_size=16, topk_blocks=2, chunk_size=32,
                              device_cache_blocks=2, kernel_backend="triton")
    else:
        hq, hkv, d, chunks = 32, 8, 128, 48  # 24K tokens in 512-token chunks
        config = InfLLMConfig(num_sink_tokens=128, local_window=4096, block_size=128, topk_blocks=16,
                              chunk_size=512, device_cache_blocks=16, kernel_backend="triton")
    c = config.chunk_size
    g = torch.Generator(device=device).manual_seed(7)
    q = torch.randn(hq, chunks * c, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(hkv, chunks * c, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(hkv, chunks * c, d, device=device, dtype=dtype, generator=g)
    scale = 1 / math.sqrt(d)
    outs, times = {}, {}
    for overlap in (False, True):
        layer = _layer_memory(ops, config, hq, hkv, d, dtype, device, overlap)
        pieces, elapsed = [], []
        for i in range(chunks):
            _sync(device)
            start = time.perf_counter()
            pieces.append(layer.forward(q[:, i * c : (i + 1) * c], k[:, i * c : (i + 1) * c], v[:, i * c : (i + 1) * c], scale))
            _sync(device)
            elapsed.append((time.perf_counter() - start) * 1e3)
        later = sorted(elapsed[chunks // 2 :])  # once the memory holds blocks beyond the window
        outs[overlap], times[overlap] = torch.cat(pieces, dim=1), later[len(later) // 2]
        misses = layer.blocks.misses
        del layer
    label = f"Hq{hq}/Hkv{hkv} D{d} {chunks}x{c} tokens, cache {config.device_cache_blocks} blocks"
    err = _max_err(outs[True].float(), outs[False].float())
    rows = [CheckRow("overlap = serial", label, str(dtype), err, 0.0, err == 0.0 and misses > 0)]
    timing = [TimeRow("chunk, overlap", label, str(dtype), times[True], "same, serial", times[False])]
    return rows, timing


def _print_tables(checks: list[CheckRow], times: list[TimeRow]) -> None:
    print(f"{'check':<18} {'shape':<40} {'dtype':<15} {'max err':>10} {'tol':>8}  ok")
    for r in checks:
        print(f"{r.what:<18} {r.shape:<40} {r.dtype:<15} {r.max_err:>10.2e} {r.tol:>8.0e}  {'yes' if r.ok else 'NO'}")
    print()
    print(f"{'timing':<15} {'shape':<40} {'dtype':<15} {'triton ms':>10} {'baseline':<20} {'ms':>9} {'ratio':>7}")
    for r in times:
        ratio = r.triton_ms / r.baseline_ms if r.baseline_ms > 0 else math.inf
        print(
            f"{r.what:<15} {r.shape:<40} {r.dtype:<15} {r.triton_ms:>10.3f} {r.baseline:<20} {r.baseline_ms:>9.3f} "
            f"{ratio:>7.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy shapes; on CPU needs TRITON_INTERPRET=1")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement (median)")
    args = parser.parse_args(argv)

    if torch.cuda.is_available():
        device = torch.device("cuda")
        dtypes = [torch.bfloat16, torch.float16]
        name = torch.cuda.get_device_name(device)
    elif args.tiny and os.environ.get("TRITON_INTERPRET") == "1":
        device = torch.device("cpu")
        dtypes = [torch.float16, torch.float32]  # the interpreter computes bfloat16 wrongly
        name = "CPU (triton interpreter)"
    else:
        print("gpu_check needs a CUDA device (or --tiny with TRITON_INTERPRET=1 on CPU)", file=sys.stderr)
        return 2
    ops = resolve_ops("triton", device)
    started = time.perf_counter()
    print(f"device: {name}; torch {torch.__version__}; triton {sys.modules['triton'].__version__}")

    checks = check_correctness(ops, _shapes(args.tiny), dtypes, device)
    reps = 2 if device.type == "cpu" else args.reps
    times = check_speed(ops, _timing_shapes(args.tiny), dtypes[0], device, reps)
    overlap_checks, overlap_times = check_overlap(ops, dtypes[0], device, args.tiny)
    checks += overlap_checks
    times += overlap_times
    _print_tables(checks, times)
    failed = [r for r in checks if not r.ok]
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed in {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            record = {"device": name, "checks": [asdict(r) for r in checks], "times": [asdict(r) for r in times]}
            json.dump(record, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
