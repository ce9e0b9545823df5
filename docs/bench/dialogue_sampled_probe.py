"""Probe behind BENCHMARKS.md, "A document pasted, then asked about": the dialogue of a prose case with the chat's
default sampling (`CHAT_DEFAULTS`: temperature 0.7, the penalty that spares the context, at least one token) and a
few seeds, as a user of `python -m inf_llm.chat` would get it; the first reply at most 128 tokens.

    OMP_NUM_THREADS=1 python docs/bench/dialogue_sampled_probe.py TASK LENGTH DEPTHS SEEDS PRESET.yaml [PRESET.yaml ...]
"""
import sys
from dataclasses import replace

import torch

from chat.chat_format import ChatFormat
from chat.conversation import Conversation
from inf_llm.bench.prose_tasks import MAX_NEW_TOKENS, build_prose_prompt, dialogue_of, score
from inf_llm.config.files import load_config
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import CHAT_DEFAULTS, SamplingParams
from inf_llm.model.loading import load_model

torch.set_num_threads(1)
model, tok = load_model(None, device="cpu")
task, length = sys.argv[1], int(sys.argv[2])
depths, seeds = [float(d) for d in sys.argv[3].split(",")], int(sys.argv[4])
for preset in sys.argv[5:]:
    engine = Engine(model, tok, load_config(preset).config)
    found = []
    for depth in depths:
        dialogue = dialogue_of(build_prose_prompt(tok, task, length, depth, 0))
        for seed in range(seeds):
            engine.reset()
            params = SamplingParams(**CHAT_DEFAULTS, max_new_tokens=128, seed=seed)
            conversation = Conversation(engine, ChatFormat.create(tok), params)
            pasted = conversation.ask(dialogue.paste)
            conversation.params = replace(conversation.params, max_new_tokens=MAX_NEW_TOKENS[task])
            for question, answers in dialogue.questions:
                reply = conversation.ask(question)
                found.append(score(answers, reply.text))
                print(preset, depth, seed, found[-1], repr(pasted.text[:50]), "->", repr(reply.text[:70]), flush=True)
    print("==", preset, sum(found), "of", len(found), flush=True)
