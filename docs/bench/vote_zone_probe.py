"""Probe behind BENCHMARKS.md, "A short conversation's own settings": which blocks each layer's question vote names,
and how many lie in the first 12,288 tokens (read with the wide window under wide_window_until=12288), for one prose
case; with ZPATCH=1 the vote first scales each window's blocks by their own mean and spread (vote_zone_scaled_patch).

    OMP_NUM_THREADS=1 python docs/bench/vote_zone_probe.py multivalue 32768 0.5 0 short_conversation=null \
        short_conversation_until=null [KEY=VALUE ...]

(run on 2026-12-05 before the preset had short_conversation, with no such overrides; output
docs/bench/vote-zone-probe.txt: the preset, the wide-window schedule, the same with ZPATCH=1, and the 16K twohop
case at 90% with ZPATCH=1)
"""
import os, sys, torch, collections
from inf_llm.bench.methods import parse_overrides
from inf_llm.bench.prose import answer
from inf_llm.bench.prose_tasks import build_prose_prompt
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.model.loading import load_model
import inf_llm.memory.model_memory as mm
if os.environ.get("ZPATCH"):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import vote_zone_scaled_patch  # noqa: F401
torch.set_num_threads(1)
task, length, depth, seed = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
config = load_config(default_preset_for(None)).config.replace(**parse_overrides(sys.argv[5:]))
rec = []
orig = mm.tally_votes
def tv(votes, how):
    rec.append([list(v) for v in votes]); return orig(votes, how)
mm.tally_votes = tv
model, tok = load_model(None, device="cpu")
engine = Engine(model, tok, config)
p = build_prose_prompt(tok, task, length, depth, seed)
r = answer(engine, p, min_new_tokens=1)
s, b = config.num_sink_tokens, config.block_size
needle = [sorted(set(range((a - s) // b, (e - 1 - s) // b + 1))) for a, e in p.needles]
ans = [needle[i] for i in p.answer_needles]
voted = engine.memory.layers[0].end_blocks.tolist()
zone = (12288 - s) // b
votes = rec[-1]
print(sys.argv[1:], "score", r["score"], repr(r["reply"][:60]))
print("answer needle blocks", ans, "all needles", needle)
print("voted", voted, "near", None if engine.memory.layers[0].end_near is None else engine.memory.layers[0].end_near.tolist())
print("layers' votes in the first 12K tokens: %d of %d" % (sum(1 for v in votes for x in v if x < zone), sum(len(v) for v in votes)))
top1 = [v[0] for v in votes if v]
print("layers' first votes <zone:", sum(1 for x in top1 if x < zone), "of", len(top1))
flat = set(x for n in ans for x in n)
print("layers voting a needle block:", sum(1 for v in votes if flat & set(v)), "per layer first 5:", [v[:5] for v in votes])
