"""Probe (python docs/bench/vote_heads_probe.py OUT_FOLDER multiquery:65536:0.5:0 ...): at the prompt end's vote, per layer and query head, each block's peak logit over the voting queries (P),
over the chunk before (Bprev) and over the last chunk's earlier queries (Bearly); the first stage's rise scores; the
preset's votes; the needles; the reply. Saved per case as a torch file."""
import sys, json, torch
from inf_llm.bench.corpus import load_paragraphs
from inf_llm.bench.prose_tasks import build_prose_prompt
from inf_llm.bench.prose import answer
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.memory import layer_memory as lm
from inf_llm.memory.ranking import ranking_query, block_scores
from inf_llm.memory.retrieval_trace import RetrievalTrace
from inf_llm.model.loading import load_model

outdir = sys.argv[1]
load_paragraphs()
model, tok = load_model(None, device="cpu")
cfg = load_config(default_preset_for(None)).config

def head_peaks(queries, keys):
    hq, tq, d = queries.shape
    hkv, n, b, _ = keys.shape
    g = hq // hkv
    out = torch.empty(n, hq)
    grouped = queries.float().reshape(hkv, g * tq, d)
    step = max(1, 2**19 // (hkv * g * tq * b))
    for s in range(0, n, step):
        part = keys[:, s:s + step]; w = part.shape[1]
        lg = torch.bmm(grouped, part.reshape(hkv, w * b, d).float().transpose(1, 2))
        out[s:s + w] = lg.view(hkv, g, tq, w, b).amax(dim=(2, 4)).reshape(hq, w).T
    return out

rec = []
orig = lm.LayerMemory._vote_prompt_end
def patched(self, q):
    n0 = len(self.end_votes)
    orig(self, q)
    c, hkv = self.config, self.shape.num_kv_heads
    full_before = self.end_baseline
    qq, before = self._vote_queries(q)
    n = self.blocks.num_blocks
    if not n or not qq.shape[1]:
        return
    early = before[:, full_before.shape[1]:]
    ids = list(range(n))
    P = self.blocks.score_blocks(ids, lambda k: head_peaks(qq, k))
    Bp = self.blocks.score_blocks(ids, lambda k: head_peaks(full_before, k))
    Be = self.blocks.score_blocks(ids, lambda k: head_peaks(early, k)) if early.shape[1] else None
    query = ranking_query(qq, c.block_ranking, hkv) - ranking_query(before, c.block_ranking, hkv)
    first = block_scores(self.reprs, query, hkv, False, self._repr_absmax)
    rec.append({"P": P.half(), "Bp": Bp.half(), "Be": None if Be is None else Be.half(), "first": first.half(),
                "votes": self.end_votes[-1] if len(self.end_votes) > n0 else []})
lm.LayerMemory._vote_prompt_end = patched
for spec in sys.argv[2:]:
    task, length, depth, seed = spec.split(":")
    prompt = build_prose_prompt(tok, task, int(length), float(depth), int(seed))
    layout = RetrievalTrace(cfg.block_size, cfg.num_sink_tokens)
    needles = [layout.blocks_of(a, e) for a, e in prompt.needles]
    rec.clear()
    engine = Engine(model, tok, cfg)
    res = answer(engine, prompt, min_new_tokens=1)
    end = engine.memory.layers[0].end_blocks
    torch.save({"task": task, "length": int(length), "depth": float(depth), "seed": int(seed),
        "needles": needles, "answer_needles": list(prompt.answer_needles), "num_blocks": engine.memory.layers[0].blocks.num_blocks,
        "reply": res["reply"], "score": res["score"], "end_blocks": end.tolist() if end is not None else None,
        "layers": rec[-30:]}, f"{outdir}/{task}-{length}-{depth}-{seed}.pt")
    print(task, length, depth, seed, res["score"], repr(res["reply"][:80]), flush=True)
