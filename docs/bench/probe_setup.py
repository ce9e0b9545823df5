"""What the probes that replay one reading under several settings share (`paste_reply_probe.py`,
`reply_far_steps_probe.py`): the embedded model and its long preset in an engine whose rotary table has room for
far distances, settings changed on the live memory, and a prompt read once up to its last chunk.

Settings set this way skip the schema's checks (a vote without its tally settings, a distance switched between two
decoding steps), which a probe may do and a config may not.
"""
import copy
import json
import time

from chat.chat_format import ChatFormat
from inf_llm.bench.corpus import load_paragraphs
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.model.loading import load_model
from inf_llm.model.rope import RotaryTable


def load_engine():
    """(tokenizer, the preset's settings past a short conversation, an engine under them, the chat's format)."""
    load_paragraphs()
    model, tok = load_model(None)
    base = load_config(default_preset_for(None)).config.long_config()
    engine = Engine(model, tok, base)
    mc = model.config
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    # Room for every variant's distances (the same rotations as the preset's table, further on).
    table = RotaryTable(model.model.rotary_emb, head_dim, 2048, engine.device)
    for layer in engine.memory.layers:
        layer.rotary = table
    return tok, base, engine, ChatFormat.create(tok)


def unchecked(cfg, **changes):
    """A copy of cfg with `changes`, not validated."""
    cfg = copy.copy(cfg)
    for name, value in changes.items():
        object.__setattr__(cfg, name, value)
    return cfg


def use(engine, cfg):
    """The engine, its memory and every layer read and decode under cfg from now on."""
    engine.config = cfg
    engine.memory.config = cfg
    for layer in engine.memory.layers:
        layer.config = cfg


def read_to_last_chunk(engine, base, ids):
    """Read ids into an empty engine up to the last prefill boundary before its last chunk (the chunks are those
    of reading ids in one feed), without the prompt end's vote, which belongs to the rest's feed; returns (where
    the rest starts, a snapshot to replay from, seconds)."""
    engine.reset()
    end = len(ids) - 1 - base.chunk_size
    split = (end // engine.prefill_chunk) * engine.prefill_chunk
    if split == end:
        split -= engine.prefill_chunk
    start = time.time()
    use(engine, unchecked(base, prompt_end_blocks=0))
    engine.feed(ids[:split])
    use(engine, base)
    return split, engine.snapshot(), time.time() - start


def done_cases(out):
    """(task, depth, variant) of every record already in the output file, so that a stopped probe resumes."""
    try:
        with open(out) as handle:
            return {(r["task"], r["depth"], r["variant"]) for r in map(json.loads, handle)}
    except FileNotFoundError:
        return set()
