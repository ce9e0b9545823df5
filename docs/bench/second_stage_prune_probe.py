"""Probe behind BENCHMARKS.md, "The second stage's cost at decoding steps": could the second stage score fewer
candidates and choose exactly the same blocks? The key bounds of the first stage are an upper bound of each
candidate's exact score (the sum over query heads of the largest logit), so a scan in descending bound order may
stop once the m-th best exact score so far is at least the next bound. This counts, at every decoding step and
layer, how many of the shortlist's candidates (the kept ones aside) such a scan scores before it may stop.

    OMP_NUM_THREADS=1 python docs/bench/second_stage_prune_probe.py 8192
"""
import sys, torch
from inf_llm.bench.prose import answer
from inf_llm.bench.prose_tasks import build_prose_prompt
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.memory.layer_memory import LayerMemory
from inf_llm.memory import ranking
from inf_llm.model.loading import load_model

torch.set_num_threads(1)
length = int(sys.argv[1])
config = load_config(default_preset_for(None)).config
orig = LayerMemory._second_stage
STATS = []

def probe(self, q, scores, candidates, topk):
    if q.shape[1] == 1:
        cfg = self.config
        listed = ranking.select_blocks(scores, cfg.rerank_blocks)
        keep = min(cfg.rerank_keep_blocks, topk)
        first = scores[listed]
        places = ranking.select_blocks(first, keep)
        hkv = self.shape.num_kv_heads
        query = ranking.ranking_query(q, "bounds", hkv)  # (2*hkv, D)
        def both(keys):
            ex = ranking.exact_block_scores(q, keys)
            kb = ranking.key_bounds(keys.transpose(0, 1))  # (S, 2hkv, D)
            bd = (kb * query).sum(dim=(1, 2))
            return torch.stack((ex, bd), 1)
        sc = self.blocks.score_blocks(listed.tolist(), both)
        mask = torch.ones(listed.shape[0], dtype=torch.bool); mask[places] = False
        ex, bd = sc[mask, 0], sc[mask, 1]
        assert (ex <= bd + 1e-3).all(), (ex - bd).max()
        order = torch.argsort(bd, descending=True)
        m = topk - keep
        best = []
        n = ex.shape[0]
        stop = n
        for i, j in enumerate(order.tolist()):
            if len(best) >= m and best[m - 1] >= bd[j]:
                stop = i; break
            best = sorted(best + [float(ex[j])], reverse=True)[:m]
        STATS.append((self.index, stop, n))
    return orig(self, q, scores, candidates, topk)

LayerMemory._second_stage = probe
model, tok = load_model(None, device="cpu")
engine = Engine(model, tok, config)
r = answer(engine, build_prose_prompt(tok, "single", length, 0.5, 0))
print(r["score"], repr(r["reply"][:40]))
import statistics
fr = [s / n for _, s, n in STATS]
print("steps*layers", len(STATS), "mean fraction scored", statistics.mean(fr), "median", statistics.median(fr), "min", min(fr))
for L in (0, 5, 10, 15, 20, 25, 29):
    f = [s / n for l, s, n in STATS if l == L]
    print(L, round(statistics.mean(f), 3))
