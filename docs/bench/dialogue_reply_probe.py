"""Probe behind BENCHMARKS.md, "The 16K dialogue and the reply to the document": the preset's 16K dialogue
(every task, depths 10/50/90%) with the reply to the pasted document either replaced by a fixed neutral one
before the questions are asked (`forced`: the next turn reads the transcript again from the common prefix) or
sampled as the chat samples it (`sampled`: temperature 0.7, repetition penalty 1.2, a fixed sampling seed); the
questions are answered greedily, as the benchmark answers them.

    OMP_NUM_THREADS=1 python docs/bench/dialogue_reply_probe.py forced|sampled OUT.jsonl [seed] [sampling seed]
"""
import json, sys, torch
from dataclasses import replace
from chat.chat_format import ChatFormat
from chat.conversation import Conversation
from inf_llm.bench.corpus import load_paragraphs
from inf_llm.bench.prose_tasks import MAX_NEW_TOKENS, build_prose_prompt, dialogue_of, score
from inf_llm.config.files import load_config
from inf_llm.config.presets import default_preset_for
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from inf_llm.model.loading import load_model

torch.set_num_threads(1)
mode, out = sys.argv[1], sys.argv[2]
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
sampling_seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1234
assert mode in ("forced", "sampled"), mode
REPLY = "I'm ready to review the details of the workshop.\n\nPlease go ahead and present the next question."
load_paragraphs()
model, tok = load_model(None)
engine = Engine(model, tok, load_config(default_preset_for(None)).config)
done = set()
try:
    done = {(r["task"], r["depth"]) for r in map(json.loads, open(out))}
except FileNotFoundError:
    pass
for task in ("single", "multikey", "multivalue", "multiquery", "twohop"):
    for depth in (0.1, 0.5, 0.9):
        if (task, depth) in done:
            continue
        prompt = build_prose_prompt(tok, task, 16384, depth, seed)
        engine.reset()
        dialogue = dialogue_of(prompt)
        if mode == "forced":
            params = SamplingParams(temperature=0.0, max_new_tokens=64, min_new_tokens=1)
        else:
            params = SamplingParams(temperature=0.7, repetition_penalty=1.2, max_new_tokens=64, min_new_tokens=1,
                                    seed=sampling_seed)
        conv = Conversation(engine, ChatFormat.create(tok), params)
        pasted = conv.ask(dialogue.paste)
        if mode == "forced":
            conv.messages[-1]["content"] = REPLY
        conv.params = replace(conv.params, temperature=0.0, repetition_penalty=1.0, seed=None,
                              max_new_tokens=MAX_NEW_TOKENS[task])
        scores, replies = [], []
        for question, answers in dialogue.questions:
            reply = conv.ask(question)
            scores.append(score(answers, reply.text)); replies.append(reply.text)
        rec = {"task": task, "depth": depth, "seed": seed, "score": sum(scores) / len(scores), "replies": replies,
               ("own_paste_reply" if mode == "forced" else "paste_reply"): pasted.text,
               "memory_tokens": len(engine.tokens)}
        print(json.dumps(rec)[:300], flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
