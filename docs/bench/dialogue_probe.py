"""Probe behind BENCHMARKS.md, "A document pasted, then asked about": prose cases asked as a dialogue
(`inf_llm.bench.prose.converse`) under variants of the preset, a score line per case and a JSON record each.

    OMP_NUM_THREADS=1 python docs/bench/dialogue_probe.py LENGTH TASK:DEPTH:SEED,... OUT.jsonl "KEY=VALUE ..." ...
"""
import sys, torch, json
from inf_llm.bench.methods import parse_overrides
from inf_llm.bench.prose import converse
from inf_llm.bench.prose_tasks import build_prose_prompt
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.model.loading import load_model
torch.set_num_threads(1)
model, tok = load_model(None, device="cpu")
length = int(sys.argv[1]); cases = [c.split(":") for c in sys.argv[2].split(",")]
out = open(sys.argv[3], "a")
for v in sys.argv[4:]:
    sets = v.split()
    config = load_config(default_preset_for(None)).config.replace(**parse_overrides(sets))
    engine = Engine(model, tok, config)
    scores = []
    for task, depth, seed in cases:
        prompt = build_prose_prompt(tok, task, length, float(depth), int(seed))
        r = converse(engine, prompt)
        scores.append(r["score"])
        out.write(json.dumps({"variant": v, "task": task, "depth": depth, "seed": seed, "length": length, "score": r["score"], "paste": r["paste_reply"], "replies": [t["reply"] for t in r["turns"]]}) + "\n"); out.flush()
        print(v, task, depth, seed, r["score"], repr(r["turns"][0]["reply"][:70]), flush=True)
    print("==", v, sum(scores) / len(scores), flush=True)
