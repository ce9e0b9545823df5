"""Probe patch (vote_zone_probe.py, ZPATCH=1): the question's vote scores each block's rise against the mean and
spread of the blocks formed under the same window (both of its stages), so that blocks read with wide_window and
those read with local_window compete on one footing. Not part of the project: the reply stayed wrong."""
import os, torch
import inf_llm.memory.layer_memory as lm
from inf_llm.memory.ranking import ranking_query, block_scores, select_blocks, peak_block_scores
MODE = os.environ.get("ZMODE", "z")  # z: both stages; z2: second only
def zones(cfg, n):
    if cfg.wide_window is None:
        return None
    first = -(-(cfg.wide_window_until - cfg.num_sink_tokens) // cfg.block_size)  # first block starting at/after N
    first = max(0, min(first, n))
    if first in (0, n):
        return None
    return first
def norm(x, first):
    """x scaled by the mean and spread of x[:first] and of x[first:], each part by its own (first=0: one part)."""
    out = x.clone()
    for sl in ((slice(0, first), slice(first, None)) if first else (slice(None),)):
        v = x[sl]
        out[sl] = (v - v.mean()) / v.std().clamp(min=1e-6)
    return out
def vote(self, q):
    cfg, hkv = self.config, self.shape.num_kv_heads
    n = self.blocks.num_blocks
    if not n:
        return
    q, before = self._vote_queries(q)
    if not q.shape[1]:
        return
    query = ranking_query(q, cfg.block_ranking, hkv)
    if before.shape[1]:
        query = query - ranking_query(before, cfg.block_ranking, hkv)
    size = cfg.prompt_end_shortlist or cfg.rerank_blocks
    first = zones(cfg, n)
    s1 = block_scores(self.reprs, query, hkv, False, self._repr_absmax)
    if first is not None and MODE == "z":
        s1 = norm(s1, first)
    listed = select_blocks(s1, size)
    shortlist = listed.sort().values
    ids = shortlist.tolist()
    def rise_of(keys):
        peaks = peak_block_scores(q, keys)
        return peaks - peak_block_scores(before, keys) if before.shape[1] else peaks
    rise = self.blocks.score_blocks(ids, rise_of)
    if first is not None:
        k = int((shortlist < first).sum())
        if 1 < k < len(ids) - 1:
            rise = torch.cat((norm(rise[:k], k), norm(rise[k:], 0)))
    places = select_blocks(rise, cfg.prompt_end_blocks)
    best_first = places[torch.sort(rise[places], descending=True, stable=True).indices]
    self.end_votes.append(shortlist[best_first].tolist())
lm.LayerMemory._vote_prompt_end = vote
