"""Probe: where the question's vote loses a needle at 64K. For each layer: the needle blocks' ranks under the
first stage's rise (is it inside the 512 shortlist?), under the exact rise over every block, and what was voted."""
import sys, json, torch
from inf_llm.bench.corpus import load_paragraphs
from inf_llm.bench.prose_tasks import build_prose_prompt
from inf_llm.bench.prose import answer
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.memory import layer_memory as lm
from inf_llm.memory.ranking import ranking_query, block_scores, select_blocks, peak_block_scores
from inf_llm.memory.retrieval_trace import RetrievalTrace
from inf_llm.model.loading import load_model

task, length, depth, seed = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
load_paragraphs()
model, tok = load_model(None, device="cpu")
cfg = load_config(default_preset_for(None)).config
prompt = build_prose_prompt(tok, task, length, depth, seed)
layout = RetrievalTrace(cfg.block_size, cfg.num_sink_tokens)
spans = [prompt.needles[i] for i in prompt.answer_needles]
needle_blocks = [layout.blocks_of(a, e) for a, e in spans]
print("needles", needle_blocks, flush=True)
rows = []
orig = lm.LayerMemory._vote_prompt_end

def patched(self, q):
    n_before = len(self.end_votes)
    orig(self, q)
    cfg, hkv = self.config, self.shape.num_kv_heads
    n = self.blocks.num_blocks
    qq, before = self._vote_queries(q)  # (the probe ran before this split was a method; the same lines)
    query = ranking_query(qq, cfg.block_ranking, hkv) - ranking_query(before, cfg.block_ranking, hkv)
    first = block_scores(self.reprs, query, hkv, False, self._repr_absmax)
    first_rank = torch.argsort(torch.argsort(first, descending=True, stable=True))
    import time
    exact = torch.empty(n); peak_q = torch.empty(n); t_all = t_q = 0.0
    for s in range(0, n, 500):
        ids = list(range(s, min(n, s + 500)))
        t0 = time.perf_counter()
        exact[s:s + len(ids)] = self.blocks.score_blocks(
            ids, lambda keys: peak_block_scores(qq, keys) - peak_block_scores(before, keys))
        t1 = time.perf_counter()
        peak_q[s:s + len(ids)] = self.blocks.score_blocks(ids, lambda keys: peak_block_scores(qq, keys))
        t_all += t1 - t0; t_q += time.perf_counter() - t1
    exact_rank = torch.argsort(torch.argsort(exact, descending=True, stable=True))
    # alternative first stages: each voting query's bound score, best over the queries, minus the baseline's mean
    per_q = torch.stack([block_scores(self.reprs, ranking_query(qq[:, i:i + 1], cfg.block_ranking, hkv), hkv, False,
                                      self._repr_absmax) for i in range(qq.shape[1])])
    base = block_scores(self.reprs, ranking_query(before, cfg.block_ranking, hkv), hkv, False, self._repr_absmax)
    variants = {"A": first, "B": per_q.amax(0) - base, "C": per_q.amax(0), "D": per_q.mean(0) - base, "E": peak_q}
    top_exact = set(torch.argsort(exact, descending=True, stable=True)[:cfg.prompt_end_blocks].tolist())
    recall = {}
    for name, sc in variants.items():
        for k in (512, 1024):
            short = set(torch.argsort(sc, descending=True, stable=True)[:k].tolist())
            recall[f"{name}{k}"] = len(top_exact & short)
    vr = {name: [[int(torch.argsort(torch.argsort(sc, descending=True, stable=True))[b]) for b in bl] for bl in needle_blocks]
          for name, sc in variants.items()}
    voted = self.end_votes[-1] if len(self.end_votes) > n_before else []
    rows.append({"layer": len(rows), "n": n,
                 "first_rank": [[int(first_rank[b]) for b in bl] for bl in needle_blocks],
                 "exact_rank": [[int(exact_rank[b]) for b in bl] for bl in needle_blocks],
                 "voted_needle": [[b in voted for b in bl] for bl in needle_blocks], "recall_of_exact16": recall, "variant_ranks": vr, "t_rise_all": round(t_all, 3), "t_peak_all": round(t_q, 3)})

lm.LayerMemory._vote_prompt_end = patched
engine = Engine(model, tok, cfg)
res = answer(engine, prompt, min_new_tokens=1)
chosen = engine.memory.layers[0].end_blocks
print("reply", repr(res["reply"]), "score", res["score"])
print("end_blocks", chosen.tolist() if chosen is not None else None)
for r in rows[-30:]:
    print(json.dumps(r))
