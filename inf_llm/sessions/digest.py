"""The checksum of a session's state: a SHA-256 of a canonical encoding of its content (nested dicts, lists,
scalars and tensors), so that damage is found before anything is resumed from it."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import torch

from inf_llm.sessions.names import SessionError


def _digest(value: Any, h) -> None:
    """Feed a canonical encoding of value (nested dicts, lists, scalars, tensors) into hash h."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key in sorted(value, key=str):
            _digest(key, h)
            _digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        if all(type(item) is int for item in value):
            # A conversation's token ids (a million at 1M tokens): the bytes the loop below would feed, at once.
            h.update("".join(f"int:{item!r}" for item in value).encode())
            return
        for item in value:
            _digest(item, h)
    elif isinstance(value, float):
        h.update(b"F" + struct.pack("<d", value))
    elif value is None or isinstance(value, (bool, int, str)):
        h.update(f"{type(value).__name__}:{value!r}".encode())
    else:
        raise SessionError(f"cannot store a {type(value).__name__} in a session")


def content_sha256(payload: dict) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != "sha256"}, h)
    return h.hexdigest()
