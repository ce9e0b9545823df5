"""The Triton kernels against the torch reference, and the backend dispatcher (chosen once, never a silent fallback).

The kernels run on CPU in triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before the
kernels are defined. Setting it in this process would leak into every later test module, so the comparisons run
in one subprocess: this file run as ``python -m tests.test_kernels --worker OUT.json``, which checks every case
of `_cases()` against `inf_llm.kernels.reference` and writes one verdict per case (None or the mismatch).
The pytest side parametrises over the same case list and asserts each verdict, so a failure names its case.

Shapes are small (the interpreter is 60-500x slower than torch) but cover: head_dim 16/32/64 (and 128, 48, and
a value dim unlike the key dim), Tq 1/16/33, Tk 1/17/64 (and a few hundred for tile skipping and key splits),
grouped 3:1 and 1:1 heads, every mask, offsets that leave rows empty, float32 (tight) and float16 (loose).
bfloat16 is not compared: triton's interpreter upcasts it after every load, so its results are wrong there.
Tile skipping is checked by poisoning with NaN the keys and values of tiles that no query may see: loading one
would spread the NaN.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from inf_llm import kernels
from inf_llm.kernels import reference

REPO_ROOT = Path(__file__).resolve().parent.parent
MASKS = ("none", "causal", "band", "complement")
# (atol, rtol) per compared dtype: float32 is exact up to summation order; float16 rounds the probabilities
# before the P @ V product, as flash attention does.
TOLERANCE = {"float32": (2e-5, 2e-5), "float16": (3e-3, 3e-3)}
# Larger than any key tile the kernels use, so that a block of this many keys outside the visible range is
# a whole tile a correct kernel never loads.
MAX_BLOCK_N = 64


# --------------------------------------------------------------------------------------------------------------
# The case list (shared by both processes; plain data)
# --------------------------------------------------------------------------------------------------------------


def _cases() -> list[dict]:
    cases = []
    grid = [(mask, tq, tk) for mask in MASKS for tq in (1, 16, 33) for tk in (1, 17, 64)]
    for n, (mask, tq, tk) in enumerate(grid):
        # Each (mask, Tq, Tk) runs in both dtypes, with the other head grouping and another head_dim each time;
        # the offset rotates through "queries at the end of the keys", "after all keys" and "before them".
        offsets = (tk - tq, tk, -3)
        for m, dtype in enumerate(("float32", "float16")):
            cases.append(dict(
                kind="attend", mask=mask, tq=tq, tk=tk, dtype=dtype,
                hq=6 if (n + m) % 2 == 0 else 2, hkv=2, dk=(16, 32, 64)[(n + m) % 3], dv=None,
                q_offset=offsets[(n + m) % 3], window=max(1, tk // 3 + m), splits=None, layout="contiguous",
            ))
    base = dict(kind="attend", dtype="float32", hq=8, hkv=2, dk=32, dv=None, splits=None, layout="contiguous")
    # Key splits (the decode path on a GPU), including more splits than key tiles.
    for mask, window in (("none", 0), ("band", 100), ("complement", 100), ("causal", 0)):
        for splits in (3, 50):
            cases.append({**base, "mask": mask, "tq": 1, "tk": 300, "q_offset": 299, "window": window,
                          "splits": splits})
    cases.append({**base, "mask": "causal", "tq": 5, "tk": 90, "q_offset": 60, "window": 0, "splits": 2,
                  "dtype": "float16"})
    # Tile skipping: keys outside every query's range are NaN (see `_poison_range`).
    for dtype in ("float32", "float16"):
        for mask, q_offset, window in (("band", 284, 40), ("complement", 284, 200), ("causal", 100, 0)):
            for splits in (None, 3):
                cases.append({**base, "kind": "poisoned", "mask": mask, "tq": 16, "tk": 300, "q_offset": q_offset,
                              "window": window, "dtype": dtype, "splits": splits})
    # Strided inputs, wide and odd head dims, a value dim unlike the key dim, mixed dtypes, empty inputs.
    for mask in MASKS:
        cases.append({**base, "mask": mask, "tq": 7, "tk": 40, "q_offset": 33, "window": 9, "layout": "strided"})
    cases.append({**base, "mask": "causal", "tq": 16, "tk": 40, "q_offset": 24, "window": 0, "dk": 128,
                  "dtype": "float16"})
    cases.append({**base, "mask": "band", "tq": 9, "tk": 40, "q_offset": 31, "window": 12, "dk": 48})
    cases.append({**base, "mask": "band", "tq": 9, "tk": 40, "q_offset": 31, "window": 12, "dk": 32, "dv": 16})
    cases.append({**base, "mask": "causal", "tq": 9, "tk": 40, "q_offset": 31, "window": 0, "dtype": "mixed"})
    cases.append({**base, "mask": "complement", "tq": 3, "tk": 40, "q_offset": 37, "window": 6, "dk": 256,
                  "dtype": "float16"})
    cases.append({**base, "mask": "none", "tq": 1, "tk": 70, "q_offset": 69, "window": 0, "hq": 8, "hkv": 1})  # 8:1
    for dtype in ("float32", "float16"):
        # Logits in the hundreds: exp overflows unless the running max is subtracted. One float32 rounding of
        # such a logit (|s| * 6e-8, about 2e-5) already moves its probability by that much, relative, so the
        # tolerance is ten times the usual (an overflow or a mask error would still be off by far more).
        cases.append({**base, "mask": "band", "tq": 16, "tk": 70, "q_offset": 54, "window": 30, "dtype": dtype,
                      "q_scale": 40.0, "tol_factor": 10.0})
    cases.append({**base, "mask": "causal", "tq": 4, "tk": 0, "q_offset": 3, "window": 0})
    cases.append({**base, "mask": "none", "tq": 0, "tk": 12, "q_offset": 0, "window": 0})
    cases.append({**base, "mask": "band", "tq": 4, "tk": 12, "q_offset": 5, "window": 0})  # band of width 0
    for dtype in ("float32", "float16"):
        for shape in ((2, 3, 17, 16), (1, 6, 1, 64), (1, 2, 40, 48)):
            cases.append(dict(kind="merge", dtype=dtype, shape=shape, layout="contiguous"))
    cases.append(dict(kind="merge", dtype="float32", shape=(2, 3, 17, 32), layout="strided"))
    cases.append(dict(kind="dispatch"))
    cases.append(dict(kind="errors"))
    for n, case in enumerate(cases):
        case["id"] = _case_id(n, case)
    return cases


def _case_id(n: int, c: dict) -> str:
    if c["kind"] in ("attend", "poisoned"):
        parts = [c["kind"], c["mask"], f"tq{c['tq']}", f"tk{c['tk']}", f"h{c['hq']}x{c['hkv']}", f"d{c['dk']}",
                 c["dtype"], f"off{c['q_offset']}", f"w{c['window']}"]
        if c["dv"] is not None:
            parts.append(f"dv{c['dv']}")
        if c["splits"] is not None:
            parts.append(f"split{c['splits']}")
        if c["layout"] != "contiguous":
            parts.append(c["layout"])
        if c.get("q_scale", 1.0) != 1.0:
            parts.append(f"qx{c['q_scale']:g}")
        return f"{n:03d}-" + "-".join(parts)
    if c["kind"] == "merge":
        return f"{n:03d}-merge-{'x'.join(map(str, c['shape']))}-{c['dtype']}-{c['layout']}"
    return f"{n:03d}-{c['kind']}"


CASES = _cases()


# --------------------------------------------------------------------------------------------------------------
# The worker (runs in the subprocess, with TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------------------------


def _dtypes(name: str) -> tuple[torch.dtype, torch.dtype]:
    # (q dtype, k/v dtype)
    pairs = {"float32": (torch.float32,) * 2, "float16": (torch.float16,) * 2, "mixed": (torch.float16, torch.float32)}
    return pairs[name]


def _make_qkv(c: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    qd, kd = _dtypes(c["dtype"])
    b, dv = 2, c["dv"] or c["dk"]
    if c["layout"] == "strided":
        # q in (B, T, H, D) memory order; k/v slices of a longer (B, T, H, D) buffer, as a cache view would be.
        q = torch.randn(b, c["tq"], c["hq"], c["dk"], generator=g).to(qd).transpose(1, 2)
        k = torch.randn(b, c["tk"] + 9, c["hkv"], c["dk"], generator=g).to(kd)[:, 4 : 4 + c["tk"]].transpose(1, 2)
        v = torch.randn(b, c["tk"] + 9, c["hkv"], dv, generator=g).to(kd)[:, 4 : 4 + c["tk"]].transpose(1, 2)
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
        return q, k, v
    q = (c.get("q_scale", 1.0) * torch.randn(b, c["hq"], c["tq"], c["dk"], generator=g)).to(qd)
    k = torch.randn(b, c["hkv"], c["tk"], c["dk"], generator=g).to(kd)
    v = torch.randn(b, c["hkv"], c["tk"], dv, generator=g).to(kd)
    return q, k, v


def _poison_range(c: dict) -> tuple[int, int]:
    """[lo, hi): whole tiles of keys that no query may see under the case's mask (worst-case tile size)."""
    first, last = c["q_offset"], c["q_offset"] + c["tq"] - 1  # positions of the first and last query
    visible_lo = max(0, first - c["window"] + 1) if c["mask"] == "band" else 0
    visible_hi = {"band": last + 1, "causal": last + 1, "complement": last - c["window"] + 1}[c["mask"]]
    below = (visible_lo // MAX_BLOCK_N) * MAX_BLOCK_N
    above = -(-visible_hi // MAX_BLOCK_N) * MAX_BLOCK_N
    if below > 0:
        return 0, below
    return above, c["tk"]


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, dtype: str, factor: float = 1.0) -> None:
    atol, rtol = (factor * t for t in TOLERANCE["float16" if dtype in ("float16", "mixed") else "float32"])
    if got.shape != want.shape or got.dtype != torch.float32:
        raise AssertionError(f"{name}: got {tuple(got.shape)} {got.dtype}, want {tuple(want.shape)} float32")
    torch.testing.assert_close(got, want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _check_attend(c: dict, seed: int) -> None:
    from inf_llm.kernels import triton_attention

    q, k, v = _make_qkv(c, seed)
    kw = dict(mask=c["mask"], q_offset=c["q_offset"], window=c["window"])
    scale = 1 / math.sqrt(c["dk"])
    want_out, want_lse = reference.attend(q, k, v, scale, **kw)
    if c["kind"] == "poisoned":
        lo, hi = _poison_range(c)
        assert hi - lo >= MAX_BLOCK_N, f"case leaves nothing to poison: [{lo}, {hi})"
        k, v = k.clone(), v.clone()
        k[:, :, lo:hi] = math.nan
        v[:, :, lo:hi] = math.nan
    got_out, got_lse = triton_attention._attend(
        q, k, v, scale, c["mask"], c["q_offset"], c["window"], num_splits=c["splits"]
    )
    factor = c.get("tol_factor", 1.0)
    _compare("out", got_out, want_out, c["dtype"], factor)
    _compare("lse", got_lse, want_lse, c["dtype"], factor)
    if c["kind"] == "poisoned":
        return
    if c["splits"] is None:
        # The public entry point is the same function with the default split count.
        pub_out, pub_lse = triton_attention.attend(q, k, v, scale, **kw)
        assert torch.equal(pub_out, got_out) and torch.equal(pub_lse, got_lse), "attend != _attend"
    # key_mass, normalised by the lse of the whole attention the queries take part in (band + complement =
    # causal), so some rows have lse = -inf when the case's offsets leave them empty.
    total_mask = "causal" if c["mask"] in ("band", "complement") else c["mask"]
    _, total_lse = reference.attend(q, k, v, scale, mask=total_mask, q_offset=c["q_offset"], window=c["window"])
    if c["layout"] == "strided":
        total_lse = total_lse.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Hq, Tq) view of (B, Tq, Hq)
    want_mass = reference.key_mass(q, k, scale, total_lse, **kw)
    got_mass = triton_attention.key_mass(q, k, scale, total_lse, **kw)
    _compare("key_mass", got_mass, want_mass, c["dtype"], factor)


def _check_merge(c: dict, seed: int) -> None:
    from inf_llm.kernels import triton_attention

    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, c["dtype"])
    b, h, t, d = c["shape"]
    outs, lses = [], []
    for _ in range(2):
        out = torch.randn(b, h, t, d, generator=g).to(dtype)
        lse = (3 * torch.randn(b, h, t, generator=g)).to(dtype)
        if c["layout"] == "strided":
            out = torch.randn(b, t, h, d, generator=g).to(dtype).transpose(1, 2)
            lse = torch.randn(b, t, 2 * h, generator=g).to(dtype)[:, :, :h].transpose(1, 2)
            assert not (out.is_contiguous() or lse.is_contiguous())
        outs.append(out)
        lses.append(lse)
    # Empty rows: one side only, then both sides (must stay out = 0, lse = -inf, no NaN).
    if t >= 2:
        lses[0][..., 0] = -math.inf
        lses[1][..., -1] = -math.inf
    if t > 2:
        lses[0][..., 1] = -math.inf
        lses[1][..., 1] = -math.inf
        outs[0][..., 1, :] = 0.0
        outs[1][..., 1, :] = 0.0
    want_out, want_lse = reference.merge(outs[0].float(), lses[0].float(), outs[1].float(), lses[1].float())
    got_out, got_lse = triton_attention.merge(outs[0], lses[0], outs[1], lses[1])
    # Inputs in float16 are converted exactly on load, so even those compare tightly.
    _compare("out", got_out, want_out, "float32")
    _compare("lse", got_lse, want_lse, "float32")


def _check_dispatch() -> None:
    from inf_llm.kernels import triton_attention

    ops = kernels.resolve_ops("triton", torch.device("cpu"))
    assert ops.name == "triton", ops
    want = (triton_attention.attend, triton_attention.merge, triton_attention.key_mass)
    assert (ops.attend, ops.merge, ops.key_mass) == want
    assert triton_attention.INTERPRETED
    # "auto" on CPU keeps the torch path even when the interpreter is available: it is for tests only.
    assert kernels.resolve_ops("auto", "cpu") == kernels.TORCH_OPS


def _check_errors() -> None:
    from inf_llm.kernels import triton_attention

    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    expectations = [
        (lambda: triton_attention.attend(q, k, v, 0.1, mask="diagonal"), ValueError, "mask"),
        (lambda: triton_attention.attend(q, torch.randn(1, 3, 5, 16), v, 0.1), ValueError, "multiple"),
        (lambda: triton_attention.attend(q, k[..., :8], v, 0.1), ValueError, "head_dim"),
        (lambda: triton_attention.attend(q, k, v[:, :, :4], 0.1), ValueError, "must match"),
        (lambda: triton_attention.attend(q.double(), k, v, 0.1), TypeError, "float32, float16 or bfloat16"),
        (lambda: triton_attention.key_mass(q, k, 0.1, torch.zeros(1, 4, 2)), ValueError, "lse"),
        (lambda: triton_attention.merge(q, q[..., 0], q[:, :2], q[:, :2, :, 0]), ValueError, "out_b"),
        (lambda: triton_attention._attend(q, k, v, 0.1, "none", 0, 0, num_splits=0), ValueError, "num_splits"),
    ]
    for call, exc, text in expectations:
        try:
            call()
        except exc as err:
            assert text in str(err), f"{exc.__name__} without {text!r}: {err}"
        else:
            raise AssertionError(f"expected {exc.__name__} mentioning {text!r}")


def _run_worker(out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker must run under TRITON_INTERPRET=1"
    torch.set_num_threads(1)  # the interpreter is single-threaded numpy; torch threads only add contention
    verdicts = {}
    for n, case in enumerate(CASES):
        try:
            if case["kind"] in ("attend", "poisoned"):
                _check_attend(case, seed=n)
            elif case["kind"] == "merge":
                _check_merge(case, seed=n)
            elif case["kind"] == "dispatch":
                _check_dispatch()
            else:
                _check_errors()
            verdicts[case["id"]] = None
        except Exception as err:  # noqa: BLE001 - every failure becomes that case's verdict
            verdicts[case["id"]] = f"{type(err).__name__}: {err}"
    Path(out_path).write_text(json.dumps(verdicts))


# --------------------------------------------------------------------------------------------------------------
# The pytest side (this process never imports triton)
# --------------------------------------------------------------------------------------------------------------


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def interpreted_verdicts() -> dict[str, str | None]:
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "verdicts.json")
        proc = subprocess.run(
            [sys.executable, "-m", "tests.test_kernels", "--worker", out_path],
            cwd=REPO_ROOT, env=_subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, f"kernel worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return json.loads(Path(out_path).read_text())


@pytest.mark.parametrize("case_id", [c["id"] for c in CASES])
def test_triton_kernel_matches_reference(interpreted_verdicts, case_id):
    assert case_id in interpreted_verdicts, "the worker did not report this case"
    verdict = interpreted_verdicts[case_id]
    assert verdict is None, verdict


def test_case_list_covers_the_brief():
    attend = [c for c in CASES if c["kind"] == "attend" and c["splits"] is None and c["layout"] == "contiguous"]
    for mask in MASKS:
        for dtype in ("float32", "float16"):
            chosen = [c for c in attend if c["mask"] == mask and c["dtype"] == dtype]
            assert {c["tq"] for c in chosen} >= {1, 16, 33}
            assert {c["tk"] for c in chosen} >= {1, 17, 64}
        assert {c["hq"] // c["hkv"] for c in attend if c["mask"] == mask} >= {1, 3}
        assert {c["dk"] for c in attend if c["mask"] == mask} >= {16, 32, 64}
    for c in CASES:
        if c["kind"] == "poisoned":
            lo, hi = _poison_range(c)
            assert hi - lo >= MAX_BLOCK_N, c["id"]


def test_resolve_torch_and_auto_on_cpu_give_the_reference():
    for backend in ("torch", "auto"):
        ops = kernels.resolve_ops(backend, torch.device("cpu"))
        assert ops.name == "torch"
        assert (ops.attend, ops.merge, ops.key_mass) == (reference.attend, reference.merge, reference.key_mass)


def test_resolve_rejects_unknown_backend():
    with pytest.raises(ValueError, match="'cuda-graphs'"):
        kernels.resolve_ops("cuda-graphs", "cpu")


def test_resolve_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.resolve_ops("triton", torch.device("cpu"))


def test_resolve_triton_on_other_devices_raises():
    with pytest.raises(RuntimeError, match="CUDA"):
        kernels.resolve_ops("triton", torch.device("meta"))


def _no_triton():
    raise ImportError("No module named 'triton'")


def test_resolve_triton_on_cuda_without_triton_raises(monkeypatch):
    monkeypatch.setattr(kernels, "_triton_ops", _no_triton)
    with pytest.raises(RuntimeError, match="triton cannot be imported"):
        kernels.resolve_ops("triton", torch.device("cuda"))


def test_resolve_auto_on_cuda_without_triton_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_triton_ops", _no_triton)
    monkeypatch.setattr(kernels, "_warned_auto_fallback", False)
    with caplog.at_level(logging.WARNING, logger="inf_llm.kernels"):
        first = kernels.resolve_ops("auto", torch.device("cuda"))
        second = kernels.resolve_ops("auto", torch.device("cuda:0"))
    assert first == second == kernels.TORCH_OPS
    warnings = [r for r in caplog.records if r.name == "inf_llm.kernels" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "triton cannot be imported" in warnings[0].getMessage()


def test_resolve_auto_on_cuda_prefers_triton(monkeypatch):
    fake = kernels.AttentionOps(name="triton", attend=len, merge=len, key_mass=len, chunk_attention=len)
    monkeypatch.setattr(kernels, "_triton_ops", lambda: fake)
    assert kernels.resolve_ops("auto", "cuda") is fake


def test_import_is_lazy_and_kernels_refuse_cpu_without_interpreter():
    # In a fresh interpreter without TRITON_INTERPRET: `inf_llm.kernels` itself does not import triton (the
    # `inf_llm` package is stubbed, because its other modules import transformers, which may import triton),
    # and the kernels, imported directly past the dispatcher, refuse CPU tensors and name the remedy.
    script = (
        "import sys, types, torch\n"
        "assert 'triton' not in sys.modules, 'torch alone imported triton: this check is void'\n"
        "pkg = types.ModuleType('inf_llm')\n"
        f"pkg.__path__ = [{str(REPO_ROOT / 'inf_llm')!r}]\n"
        "sys.modules['inf_llm'] = pkg\n"
        "import inf_llm.kernels as kernels\n"
        "kernels.resolve_ops('torch', 'cpu')\n"
        "assert 'triton' not in sys.modules, 'importing inf_llm.kernels imported triton'\n"
        "from inf_llm.kernels import triton_attention\n"
        "x = torch.randn(1, 2, 3, 16)\n"
        "try:\n"
        "    triton_attention.attend(x, x, x, 0.1)\n"
        "except RuntimeError as err:\n"
        "    assert 'TRITON_INTERPRET=1' in str(err), err\n"
        "else:\n"
        "    raise SystemExit('attend ran on CPU without the interpreter')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        raise SystemExit("usage: TRITON_INTERPRET=1 python -m tests.test_kernels --worker OUT.json")
    _run_worker(sys.argv[2])


@pytest.mark.slow
def test_gpu_check_script_runs_its_comparisons_at_tiny_shapes(tmp_path):
    """`python -m inf_llm.kernels.gpu_check --tiny` (the script a GPU session runs) on CPU under the interpreter:
    every kernel comparison passes, and the overlapped layer schedule equals the serial one exactly."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "inf_llm.kernels.gpu_check", "--tiny", "--json", str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["checks"] and all(row["ok"] for row in record["checks"])
    overlap = [row for row in record["checks"] if row["what"] == "overlap = serial"]
    assert len(overlap) == 1 and overlap[0]["max_err"] == 0.0
    assert {row["what"] for row in record["times"]} >= {"attend none", "attend band", "chunk, overlap"}
