"""Probe behind BENCHMARKS.md, "A 512-token window": the pass key (chat path, no answer prefix) traced as a prose
case: per step, the layers whose retrieved blocks hold the key's sentence whole, its rank, the attention on it.

    OMP_NUM_THREADS=1 python docs/bench/passkey_trace_probe.py LENGTH DEPTH "KEY=VALUE ..." ...
"""
import sys, torch
from inf_llm.bench.methods import parse_overrides
from inf_llm.bench.prompt import build_passkey_prompt, needle_line
from inf_llm.bench.prose_tasks import ProsePrompt
from inf_llm.bench.trace import trace_case
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.model.loading import load_model
torch.set_num_threads(1)
model, tok = load_model(None, device="cpu")
length, depth = int(sys.argv[1]), float(sys.argv[2])
p = build_passkey_prompt(tok, length, depth, 0, answer_prefix="")
prompt = ProsePrompt("single", p.ids, "", (str(p.key),), ((p.needle_token, p.needle_end),), (needle_line(p.key),), 0,
                     (p.context_start, p.context_end), "")
for v in sys.argv[3:]:
    config = load_config(default_preset_for(None)).config.replace(**parse_overrides(v.split()))
    r = trace_case(Engine(model, tok, config), prompt)
    print(f"== {v}: key {p.key} tokens {p.needle_token}-{p.needle_end} of {len(p.ids)}; reply {r['reply']!r}; {r['class']}")
    for s in r["steps"]:
        print(f"  {s.label!r:>14} at {s.start}: whole in {s.layers_whole:2d} layers, part in {s.layers_part:2d}, "
              f"rank {s.rank}, weight {s.weight:.4f}")
