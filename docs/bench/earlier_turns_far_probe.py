"""Probe behind BENCHMARKS.md, "Earlier turns far, the current message as the preset reads it": the benchmark's
command line (its arguments unchanged) with one rule added by a code change for the probe only: memory keys
(sinks, blocks, the remainder) from before the current prompt (the first token of the last feed of more than one
token: the message being read; its reply belongs to it) are placed at distance FAR (an environment variable,
default 512); the current prompt's keys stay at the global distance. The sinks and the agreed voted runs stay
where sink_memory_distance / voted_memory_distance (with voted_memory_consensus, sink_memory_with_voted) put them
when those rules place them. In one message nothing is earlier: the path is the settings' own, exactly (with
the preset and sink/voted distances equal to its global distance, the preset's); in a dialogue the pasted
document and the first reply are earlier turns. Shared positions, one ranking for all heads.

    OMP_NUM_THREADS=1 FAR=512 python docs/bench/earlier_turns_far_probe.py prose --dialogue --lengths 4K --seeds 3 \
        --methods inf-llm --set sink_memory_distance=128 --set voted_memory_distance=128 \
        --set voted_memory_consensus=0.9 --set sink_memory_with_voted=true --tag far512 --name NAME
"""
import os, sys, torch
from inf_llm.generation.engine import Engine
from inf_llm.memory.layer_memory import LayerMemory
FAR = int(os.environ.get("FAR", "512"))
START = {"at": 0}
feed = Engine.feed
def patched_feed(self, token_ids, *a, **k):
    if len(token_ids) > 1:
        START["at"] = len(self.tokens)
    return feed(self, token_ids, *a, **k)
Engine.feed = patched_feed
place = LayerMemory._place_near
def place_near(self, glob_k, chosen, far, num_memory, first_pos):
    cfg, b = self.config, self.config.block_size
    sinks = self.sink_k.shape[1]
    # Which rows the settings' own rules place near (as LayerMemory._place_near decides them).
    near = self.end_blocks if self.end_near is None else self.end_near
    voted_near = cfg.voted_memory_distance is not None and chosen is not None and self.end_blocks is not None \
        and near.numel() > 0
    kept = torch.zeros(glob_k.shape[1], dtype=torch.bool)
    if cfg.sink_memory_distance is not None and (voted_near or not cfg.sink_memory_with_voted):
        kept[:sinks] = True
    positions = torch.full((glob_k.shape[1],), -1, dtype=torch.long)  # -1: not a memory key of this rule
    positions[:sinks] = torch.arange(sinks)
    n = 0
    if chosen is not None:
        ids = chosen.tensor().cpu()
        n = ids.numel()
        positions[sinks : sinks + n * b] = (cfg.num_sink_tokens + ids[:, None] * b + torch.arange(b)).flatten()
        if voted_near:
            kept[sinks : sinks + n * b] = torch.isin(ids, near.cpu()).repeat_interleave(b)
    rem = num_memory - sinks - n * b
    if rem > 0:
        first = cfg.num_sink_tokens + self.blocks.num_blocks * b
        positions[sinks + n * b : num_memory] = first + torch.arange(rem)
    glob_k = place(self, glob_k, chosen, far, num_memory, first_pos)
    rows = torch.nonzero((positions >= 0) & (positions < START["at"]) & ~kept).flatten()
    if rows.numel() and FAR > far:
        # At position far - FAR < 0: RoPE by a negative angle (cos even, sin odd); the query sits at far.
        # The rotation table is short (the window's span): turn by at most its last position at a time.
        p, r = FAR - far, self.rotary
        rows = rows.to(glob_k.device)
        keys = glob_k[:, rows].float()
        while p > 0:
            step = min(p, r.max_position - 1)
            keys = r._apply(keys, r.cos[step], -r.sin_signed[step])
            p -= step
        glob_k[:, rows] = keys.to(glob_k.dtype)
    return glob_k
LayerMemory._place_near = place_near
from inf_llm.bench.__main__ import main
sys.exit(main(sys.argv[1:]))
