"""Probe behind BENCHMARKS.md, "How much the question's vote singles out": the tally of the question's vote (each
layer's i-th best counts 1/i) at its best blocks, against the blocks of the needles (the asked one first) and the
pass key's, for the pass key along the chat path (4K and 8K, seed 0), `single` and `multikey` in one message (4K,
seeds 0-2), under the given overrides.

    OMP_NUM_THREADS=1 python docs/bench/vote_margin_probe.py local_window=512 num_sink_tokens=64 \
        sink_memory_distance=128 voted_memory_distance=128 voted_memory_places=2
"""
import sys, torch
import inf_llm.memory.model_memory as mm
from inf_llm.bench.methods import parse_overrides
from inf_llm.bench.prompt import build_passkey_prompt, needle_line
from inf_llm.bench.prose import answer
from inf_llm.bench.prose_tasks import ProsePrompt, build_prose_prompt
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.model.loading import load_model
torch.set_num_threads(1)
overrides = sys.argv[1:]
config = load_config(default_preset_for(None)).config.replace(**parse_overrides(overrides))
LAST = {}
tv = mm.tally_votes
def tally_votes(*a, **k):
    t = tv(*a, **k); LAST["tally"] = t; return t
mm.tally_votes = tally_votes
model, tok = load_model(None, device="cpu")
engine = Engine(model, tok, config)
s, b = config.num_sink_tokens, config.block_size
def report(name, p):
    r = answer(engine, p)
    order = [p.target] + [j for j in range(len(p.needles)) if j != p.target]
    needles = [sorted(range((p.needles[i][0] - s) // b, (p.needles[i][1] - 1 - s) // b + 1)) for i in order]
    t = LAST["tally"]
    best = sorted(t, key=lambda x: (-t[x], x))[:8]
    print(name, r["score"], "needles", needles, "best", [(x, round(t[x], 2)) for x in best], repr(r["reply"][-24:]),
          flush=True)
for length in (4096, 8192):
    for depth in (0.1, 0.5, 0.9):
        p = build_passkey_prompt(tok, length, depth, 0, answer_prefix="")
        report(f"passkey {length} {depth}", ProsePrompt("single", p.ids, "", (str(p.key),), ((p.needle_token, p.needle_end),),
                                                       (needle_line(p.key),), 0, (p.context_start, p.context_end), ""))
for task in ("single", "multikey"):
    for seed in (0, 1, 2):
        for depth in (0.1, 0.5, 0.9):
            report(f"{task} {seed} {depth}", build_prose_prompt(tok, task, 4096, depth, seed))
