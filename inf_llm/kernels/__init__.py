"""Attention primitives and the one place that picks their implementation.

InfLLM's chunk step (docs/METHOD.md section 2) needs three primitives: `attend` (a partial attention returning
``(out, lse)`` under a position mask), `merge` (the exact log-sum-exp merge of two partials) and `key_mass` (the
attention each key received, for the block representatives). Two implementations share one signature:

- ``"torch"``: `reference.py`, plain torch; the CPU production path and the oracle of the tests;
- ``"triton"``: `triton_attention.py`, fused GPU kernels (on CPU only under ``TRITON_INTERPRET=1``, for tests).

`resolve_ops` is called once, when a model is set up, and returns an `AttentionOps`; nothing re-decides per call
and nothing falls back silently. ``"auto"`` chooses triton on CUDA and torch elsewhere; on
CUDA without an importable triton it uses torch and says so in a warning. triton is imported inside
`resolve_ops`, so importing this package never pays for it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from inf_llm.kernels import reference

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class AttentionOps:
    """The attention primitives of one backend; the functions have the signatures of `reference.py`."""

    name: str  # "torch" or "triton": what `resolve_ops` actually chose
    attend: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    merge: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    key_mass: Callable[..., torch.Tensor]
    # One whole InfLLM chunk (local band + global complement, and the local keys' mass); the signature of
    # `reference.chunk_attention`. The torch backend fuses it; kernels compose it from the primitives.
    chunk_attention: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


TORCH_OPS = AttentionOps(
    name="torch",
    attend=reference.attend,
    merge=reference.merge,
    key_mass=reference.key_mass,
    chunk_attention=reference.chunk_attention,
)

_warned_auto_fallback = False


def _triton_ops() -> AttentionOps:
    # Raises ImportError when triton (or its compiler) is missing; callers decide what that means.
    import functools

    from inf_llm.kernels import triton_attention

    ops = AttentionOps(
        name="triton",
        attend=triton_attention.attend,
        merge=triton_attention.merge,
        key_mass=triton_attention.key_mass,
        chunk_attention=None,
    )
    return dataclasses.replace(ops, chunk_attention=functools.partial(reference.compose_chunk_attention, ops))


def resolve_ops(backend: str, device: torch.device | str) -> AttentionOps:
    """Pick the attention primitives for ``device`` once: ``backend`` is "auto", "torch" or "triton".

    Raises ValueError for an unknown backend, and RuntimeError when "triton" is asked for but cannot run on
    ``device`` (triton missing, a non-CUDA device, or CPU without ``TRITON_INTERPRET=1``).
    """
    global _warned_auto_fallback
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)

    if backend == "torch":
        return TORCH_OPS

    if backend == "auto":
        if device.type != "cuda":
            return TORCH_OPS
        try:
            return _triton_ops()
        except ImportError as err:
            if not _warned_auto_fallback:
                logger.warning(
                    "attention backend 'auto' on %s: triton cannot be imported (%s); using the torch reference "
                    "kernels, which are slower on long contexts. Install triton or pass backend='torch' to "
                    "silence this.",
                    device,
                    err,
                )
                _warned_auto_fallback = True
            return TORCH_OPS

    # backend == "triton": the caller asked for it, so every obstacle is an error.
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "attention backend 'triton' on CPU needs triton's interpreter: set TRITON_INTERPRET=1 in the "
                "environment before starting Python (it is slow, for tests only), or use backend 'torch'"
            )
    elif device.type != "cuda":
        raise RuntimeError(f"attention backend 'triton' runs on CUDA (or CPU under TRITON_INTERPRET=1), not {device}")
    try:
        ops = _triton_ops()
    except ImportError as err:
        raise RuntimeError(f"attention backend 'triton' was requested but triton cannot be imported: {err}") from err
    if device.type == "cpu":
        from inf_llm.kernels import triton_attention

        if not triton_attention.INTERPRETED:
            # The kernels were defined before TRITON_INTERPRET was set, so they are compiled for a GPU.
            raise RuntimeError(
                "attention backend 'triton' on CPU: inf_llm.kernels.triton_attention was imported before "
                "TRITON_INTERPRET=1 was set; set it before starting Python"
            )
    return ops


__all__ = ["AttentionOps", "BACKENDS", "TORCH_OPS", "resolve_ops"]
