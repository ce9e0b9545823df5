"""Probe behind BENCHMARKS.md, "Only what the layers agree on comes near": for one pass-key case (the answer begun,
as `bench passkey`), the question's tally at its best blocks (as a fraction of what a block every layer ranks first
gets), the key's blocks, the blocks placed near, and the answer, under the given overrides.

    OMP_NUM_THREADS=1 python docs/bench/passkey_tally_probe.py 65536 0.5 local_window=512 num_sink_tokens=64 \
        sink_memory_distance=128 voted_memory_distance=128 voted_memory_consensus=0.65 sink_memory_with_voted=true
"""
import sys, torch
import inf_llm.memory.model_memory as mm
from inf_llm.bench.methods import parse_overrides
from inf_llm.bench.prompt import build_passkey_prompt, needle_line
from inf_llm.bench.prose import answer
from inf_llm.bench.prose_tasks import ProsePrompt
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.model.loading import load_model
torch.set_num_threads(1)
length, depth, overrides = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
config = load_config(default_preset_for(None)).config.replace(**parse_overrides(overrides))
LAST = {}
tv = mm.tally_votes
def tally_votes(*a, **k):
    t = tv(*a, **k); LAST.setdefault("tally", t); return t
mm.tally_votes = tally_votes
model, tok = load_model(None, device="cpu")
engine = Engine(model, tok, config)
p = build_passkey_prompt(tok, length, depth, 0)
r = answer(engine, ProsePrompt("single", p.ids, "", (str(p.key),), ((p.needle_token, p.needle_end),),
                               (needle_line(p.key),), 0, (p.context_start, p.context_end), ""))
s, b, n = config.num_sink_tokens, config.block_size, len(engine.memory.layers)
t = LAST["tally"]
near = engine.memory.layers[0].end_near
print(length, depth, r["score"], "key blocks", list(range((p.needle_token - s) // b, (p.needle_end - 1 - s) // b + 1)),
      "best/layers", [(x, round(float(t[x]) / n, 2)) for x in sorted(t, key=lambda x: (-t[x], x))[:6]],
      "near", None if near is None else near.tolist(), repr(r["reply"][:40]), flush=True)
