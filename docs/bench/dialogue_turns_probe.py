"""Probe behind BENCHMARKS.md, "The dialogue on three more seeds": where a `multiquery` reply asked in turns reads
its number. The case as a dialogue (`dialogue_of`: the document, then each word's question in a message of its own);
each question's reply traced (`InfLLMMemory.start_trace`): per decoding step, the token, the number of layers (of
30) whose retrieved blocks hold the asked word's needle sentence whole, and the memory weight (mean over layers and
heads) on each needle sentence. Under the preset and each given set of settings.

    OMP_NUM_THREADS=1 python docs/bench/dialogue_turns_probe.py TASK DEPTH SEED ["KEY=VALUE ..."]
"""
import sys

import torch

from chat.chat_format import ChatFormat
from chat.conversation import Conversation
from inf_llm.bench.methods import parse_overrides
from inf_llm.bench.prose_tasks import build_prose_prompt, dialogue_of
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from inf_llm.model.loading import load_model

torch.set_num_threads(1)
model, tok = load_model(None, device="cpu")
task, depth, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
prompt = build_prose_prompt(tok, task, 4096, depth, seed)
dialogue = dialogue_of(prompt)
fmt = ChatFormat.create(tok)
for sets in [[]] + [s.split() for s in sys.argv[4:]]:
    engine = Engine(model, tok, load_config(default_preset_for(None)).config.replace(**parse_overrides(sets)))
    conversation = Conversation(engine, fmt, SamplingParams(temperature=0.0, max_new_tokens=64))
    conversation.ask(dialogue.paste)
    conversation.params = SamplingParams(temperature=0.0, max_new_tokens=32)
    print(sets, "needles (tokens):", list(prompt.needles))
    for turn, (question, answers) in enumerate(dialogue.questions):
        trace = engine.memory.start_trace()
        reply = conversation.ask(question)
        engine.memory.stop_trace()
        steps = sorted({c.start for c in trace.chunks if c.queries == 1})
        print(f"turn {turn}: expected {answers[0]}, reply {reply.text!r}")
        asked = prompt.needles[turn]
        for start in steps:
            chunks = [c for c in trace.chunks if c.start == start and c.queries == 1]
            whole = sum(all(b in c.blocks.reshape(-1).tolist() for b in trace.blocks_of(*asked)) for c in chunks)
            weights = [sum(trace.weight_on(c, a, b) for c in chunks) / len(chunks) for a, b in prompt.needles]
            token = tok.decode([engine.tokens[start]]) if start < len(engine.tokens) else "?"
            print(f"  step at {start} (reads {token!r}): asked needle whole in {whole:2d} layers; "
                  "weight on needles " + " ".join(f"{w:.3f}" for w in weights))
