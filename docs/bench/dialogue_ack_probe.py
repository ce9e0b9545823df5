"""Probe behind BENCHMARKS.md, "A document pasted, then asked about": the 4K single-needle cases (seed 0) as a
dialogue whose first reply is the given acknowledgement instead of the model's own, then the question.

    OMP_NUM_THREADS=1 python docs/bench/dialogue_ack_probe.py "I have read the text. Ask me about the numbers." ["KEY=VALUE ..."]
"""
import sys, torch
from chat.chat_format import ChatFormat
from inf_llm.bench.methods import parse_overrides
from inf_llm.bench.prose_tasks import build_prose_prompt, dialogue_of, score
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from inf_llm.model.loading import load_model
torch.set_num_threads(1)
model, tok = load_model(None, device="cpu")
fmt = ChatFormat.create(tok)
ack = sys.argv[1]
for depth in (0.1, 0.5, 0.9):
    prompt = build_prose_prompt(tok, "single", 4096, depth, 0)
    d = dialogue_of(prompt)
    msgs = [{"role": "user", "content": d.paste}, {"role": "assistant", "content": ack}]
    first = fmt.render(msgs)
    full = fmt.render(msgs + [{"role": "user", "content": d.questions[0][0]}], add_generation_prompt=True)
    assert full[:len(first)] == first
    for sets in [[]] + [s.split() for s in sys.argv[2:]]:
        engine = Engine(model, tok, load_config(default_preset_for(None)).config.replace(**parse_overrides(sets)))
        engine.feed(first)
        text = "".join(s.text for s in engine.generate(full[len(first):], SamplingParams(temperature=0.0, max_new_tokens=32)))
        print(depth, sets, score(d.questions[0][1], text), repr(text[:80]), flush=True)
