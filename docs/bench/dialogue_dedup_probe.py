"""Probe behind BENCHMARKS.md, "A document pasted, then asked about": does the reply copy because memory brings
back the passage its first reply was copied from? The dialogue of each given case under the preset, with the
blocks that share a run of N tokens with the model's reply to the document left out of every layer's choice
while the questions are asked and answered (a probe: `LayerMemory._rank` is wrapped here, the library is not
changed).

    OMP_NUM_THREADS=1 python docs/bench/dialogue_dedup_probe.py LENGTH TASK:DEPTH:SEED,... N
"""
import sys
from dataclasses import replace

import torch

from chat.chat_format import ChatFormat
from chat.conversation import Conversation
from inf_llm.bench.prose_tasks import MAX_NEW_TOKENS, build_prose_prompt, dialogue_of, score
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from inf_llm.memory.layer_memory import LayerMemory
from inf_llm.model.loading import load_model
from inf_llm.storage.block_ids import BlockIds

BANNED: dict = {"ids": None}
rank = LayerMemory._rank


def ranked_without_banned(self, q):
    chosen = rank(self, q)
    if BANNED["ids"] is None:
        return chosen
    ids = chosen.tensor()
    return BlockIds(ids[~torch.isin(ids, BANNED["ids"])])


LayerMemory._rank = ranked_without_banned
torch.set_num_threads(1)
model, tok = load_model(None, device="cpu")
length, cases, n = int(sys.argv[1]), [c.split(":") for c in sys.argv[2].split(",")], int(sys.argv[3])
config = load_config(default_preset_for(None)).config
engine = Engine(model, tok, config)
found = []
for task, depth, seed in cases:
    dialogue = dialogue_of(build_prose_prompt(tok, task, length, float(depth), int(seed)))
    engine.reset()
    BANNED["ids"] = None
    params = SamplingParams(temperature=0.0, max_new_tokens=64)
    conversation = Conversation(engine, ChatFormat.create(tok), params)
    pasted = conversation.ask(dialogue.paste)
    reply_ids = tok(pasted.text, add_special_tokens=False)["input_ids"]
    grams = {tuple(reply_ids[i : i + n]) for i in range(len(reply_ids) - n + 1)}
    sinks, b = config.num_sink_tokens, config.block_size
    tokens, blocks = engine.tokens, engine.memory.layers[0].blocks.num_blocks
    banned = [i for i in range(blocks) if any(tuple(tokens[j : j + n]) in grams
                                               for j in range(sinks + i * b - n + 1, sinks + (i + 1) * b))]
    BANNED["ids"] = torch.tensor(banned, dtype=torch.long)
    conversation.params = replace(conversation.params, max_new_tokens=MAX_NEW_TOKENS[task])
    for question, answers in dialogue.questions:
        reply = conversation.ask(question)
        found.append(score(answers, reply.text))
        print(task, depth, seed, f"{len(banned)} of {blocks} blocks left out", found[-1], repr(pasted.text[:40]), "->",
              repr(reply.text[:60]), flush=True)
print("==", sum(found), "of", len(found), flush=True)
