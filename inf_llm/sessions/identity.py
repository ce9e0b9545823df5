"""What produced a session, recorded in it and required of the engine that resumes it: the model (architecture
facts, dtype, a fingerprint of the weights, the tokenizer's chat template), the InfLLM settings and the chat
format. Another model's or config's memory would silently give different answers."""

from __future__ import annotations

import hashlib

import torch

from inf_llm.config.schema import ADDED_LATER
from inf_llm.sessions.names import SessionError

# Settings that change speed or where blocks are kept, never outputs: a session resumes under other values.
_SPEED_ONLY_SETTINGS = ("kernel_backend", "device_cache_blocks", "cache_policy", "score_decay", "host_cache_bytes", "disk_dir")
# Settings whose saved state converts: a session resumes under another value (representatives are cast to the
# engine's dtype, and its next save writes a new generation in that dtype). Sessions saved before the default
# became float16 keep working.
_CONVERTIBLE_SETTINGS = ("repr_dtype",)
# Settings of the second stage of retrieval, and of the first stage's codes: they choose among the stored blocks and
# store nothing the blocks depend on (a saved `decode_rank_every` reuse is cut to the engine's setting; codes saved
# under other settings are computed again), so a session resumes under other values: a chat saved under the
# one-stage preset resumes under the two-stage one, which then chooses its next blocks.
# A conversation's short_conversation settings: those of a session saved once its conversation was long (or before
# they existed) do not matter to its memory, which has the config's own settings; it resumes long under any.
_SHORT_SETTINGS = ("short_conversation", "short_conversation_until")
_SECOND_STAGE_SETTINGS = ("rerank_blocks", "rerank_chunks", "rerank_keep_blocks", "rerank_reads_disk",
                          "decode_rank_every", "ranking_code_rank", "ranking_code_blocks", "shared_blocks",
                          "shared_candidates", "shared_decay", "shared_votes",
                          "prompt_end_blocks", "prompt_end_queries", "prompt_end_following", "prompt_end_rounds",
                          "prompt_end_tally", "prompt_end_skip", "prompt_end_run", "prompt_end_shortlist",
                          "prompt_end_rise", "prompt_end_baseline", "prompt_end_recent",
                          "reply_pool_blocks", "reply_pool_every")


def model_identity(model: torch.nn.Module, tokenizer) -> dict:
    """Facts that must match for a saved memory to mean the same thing: architecture, dtype, weights, template."""
    mc = model.config
    facts = {key: getattr(mc, key, None) for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                                      "num_attention_heads", "num_key_value_heads")}
    facts["dtype"] = str(next(model.parameters()).dtype)
    facts["weights"] = weights_fingerprint(model)
    if tokenizer is not None:
        template = getattr(tokenizer, "chat_template", None) or ""
        facts["tokenizer"] = hashlib.sha256(f"{len(tokenizer)}\n{template}".encode()).hexdigest()[:16]
    return facts


@torch.inference_mode()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """A digest of every parameter's name, shape and about 1,000 evenly spaced values (milliseconds, not a full hash)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step].float().cpu()
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def identity_of(engine, chat: dict) -> dict:
    """The identity recorded in (and required of) a session: model, InfLLM settings, chat format."""
    settings = {k: v for k, v in engine.config.to_dict().items() if k not in _SPEED_ONLY_SETTINGS}
    return {"model": model_identity(engine.model, engine.tokenizer), "config": settings, "chat": dict(chat)}


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: session has {a!r}, now {b!r}")
    return out


def memory_settings(settings: dict) -> dict:
    """The settings a saved memory depends on: all but those a session resumes under any value of, as saved (speed
    only, or choosing among the stored blocks). Two runs that agree on these can share a saved memory."""
    return {k: v for k, v in settings.items() if k not in _SPEED_ONLY_SETTINGS + _SECOND_STAGE_SETTINGS}


def _comparable(identity: dict, short: bool = True) -> dict:
    """An identity without the settings a resume converts (`_CONVERTIBLE_SETTINGS`) or that only choose among the
    stored blocks (`_SECOND_STAGE_SETTINGS`); a setting added after the session was saved counts as the value that
    reproduces its behaviour (`ADDED_LATER`)."""
    config = {**ADDED_LATER, **identity.get("config", {})}
    config = {k: v for k, v in config.items() if k not in _CONVERTIBLE_SETTINGS + _SECOND_STAGE_SETTINGS}
    if not short:  # a long conversation's memory has the config's own settings: the short ones do not matter
        config = {k: v for k, v in config.items() if k not in _SHORT_SETTINGS}
    return {**identity, "config": config}


def check_identity(session, engine, chat: dict) -> None:
    """SessionError naming every difference if the session (a `SessionFile`) was made by another model, config or
    chat format."""
    short = bool(session.engine_state.get("short", False))
    differences = _differences(_comparable(session.identity, short), _comparable(identity_of(engine, chat), short))
    if differences:
        raise SessionError(f"{session.path} was saved with another model, config or chat format and cannot be "
                           f"resumed here ({'; '.join(differences)}); it was left as it is. Start the chat with the "
                           "same --model-path, --inf-llm-config-path, --conv-template and --conv-system-msg, or "
                           "use another session name")
