"""Memory and speed statistics as the front ends show them: one status line, and the full `!!stats` table."""

from __future__ import annotations

import psutil
import torch

from inf_llm.memory.stats import MemoryStats

from chat.conversation import Conversation


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def process_memory() -> int:
    return psutil.Process().memory_info().rss


def _rate(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:,.1f} {unit}"


def decode_tokens_per_s(conversation: Conversation) -> float | None:
    ms = conversation.counters.last_decode_ms_per_token
    return 1000.0 / ms if ms else None


def status_line(conversation: Conversation, memory: MemoryStats | None = None,
                decode_ms_per_token: float | None = None) -> str:
    """One line: tokens / window / blocks, device vs host blocks, hit rate, prefill and decode speed, RSS."""
    s = memory or conversation.engine.stats()
    c = conversation.counters
    hit = "-" if s.cache_hit_rate is None else f"{100 * s.cache_hit_rate:.0f}%"
    decode = 1000.0 / decode_ms_per_token if decode_ms_per_token else decode_tokens_per_s(conversation)
    return (f"tokens {s.tokens:,} | window {s.window_tokens:,} | blocks {s.blocks:,}/layer"
            f" (device {s.device_blocks:,} / host {s.host_blocks:,}) | hit {hit}"
            f" | prefill {_rate(c.last_prefill_tokens_per_s, 'tok/s')} | decode {_rate(decode, 'tok/s')}"
            f" | RSS {_bytes(process_memory())}")


def _regime_rows(engine) -> list[tuple[str, str]]:
    """short_conversation: which settings the memory has now."""
    until = engine.config.short_conversation_until
    if until is None:
        return []
    state = (f"short: its own settings until {until:,} tokens" if engine.short else
             f"long: read again past {until:,} tokens")
    return [("conversation settings", state)]


def stats_rows(conversation: Conversation, session: str | None) -> list[tuple[str, str]]:
    """The `!!stats` table: (name, value) pairs. `tokens read` counts every token fed since start-up."""
    engine = conversation.engine
    s = engine.stats()
    c = conversation.counters
    hit = "-" if s.cache_hit_rate is None else f"{100 * s.cache_hit_rate:.1f}% ({s.cache_hits:,} hits, {s.cache_misses:,} misses)"
    rows = [
        ("method", engine.config.method),
        ("tokens in memory", f"{s.tokens:,}"),
        ("messages", f"{len(conversation.messages)}"),
        ("sink tokens / layer", f"{s.sink_tokens:,}"),
        ("local window / layer", f"{s.window_tokens:,} tokens"),
        *_regime_rows(engine),
        ("memory blocks / layer", f"{s.blocks:,} ({s.block_tokens:,} tokens)"),
        ("not yet in a block / layer", f"{s.remainder_tokens:,} tokens"),
        ("blocks cached on the device (all layers)", f"{s.device_blocks:,}"),
        ("blocks in host memory (all layers)", f"{s.host_blocks:,}"),
        ("device cache hit rate", hit),
        ("host memory of blocks", _bytes(s.host_bytes)),
        ("device memory of the memory", _bytes(s.device_bytes)),
        ("prefill (last turn)", _rate(c.last_prefill_tokens_per_s, "tokens/s")),
        ("decode (last turn)", _rate(decode_tokens_per_s(conversation), "tokens/s")),
        ("tokens read since start-up", f"{c.fed_tokens:,}"),
        ("tokens generated since start-up", f"{c.generated_tokens:,}"),
        ("rollbacks", f"{c.rollbacks:,}"),
        ("rollback points kept", ", ".join(f"{n:,}" for n in conversation.snapshot_points) or "-"),
        ("process memory (RSS)", _bytes(process_memory())),
    ]
    if torch.cuda.is_available() and engine.device.type == "cuda":
        rows.append(("CUDA memory allocated", _bytes(torch.cuda.memory_allocated(engine.device))))
    rows.append(("session", session or "- (not saved; !!save NAME)"))
    return rows
