"""The cost of reading a conversation again when it passes short_conversation_until: a chat pastes an 8K document
(seed 0, single), asks its question, then pastes a 4K document with its question in one message (past 12,288 tokens);
that turn's time, and the part spent reading the conversation again, against the same turn under the preset alone.

    OMP_NUM_THREADS=1 python docs/bench/short_conversation_crossing_probe.py config/smollm2-inf-llm.yaml
(output: docs/bench/short-conversation-crossing-probe.txt, the new preset first, then the preset of 2026-12-04)
"""
import sys, time, torch
from dataclasses import replace
from chat.chat_format import ChatFormat
from chat.conversation import Conversation
from inf_llm.bench.prose_tasks import build_prose_prompt, dialogue_of, score
from inf_llm.config.files import load_config
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from inf_llm.model.loading import load_model
torch.set_num_threads(1)
config = load_config(sys.argv[1]).config
model, tok = load_model(None, device="cpu")
engine = Engine(model, tok, config)
conv = Conversation(engine, ChatFormat.create(tok), SamplingParams(temperature=0.0, max_new_tokens=64, min_new_tokens=1))
first = build_prose_prompt(tok, "single", 8192, 0.5, 0)
d = dialogue_of(first)
t = time.perf_counter(); conv.ask(d.paste); print("paste 8K", round(time.perf_counter() - t, 1), "s, tokens", len(engine.tokens), flush=True)
conv.params = replace(conv.params, max_new_tokens=32)
r = conv.ask(d.questions[0][0]); print("question 1:", score(d.questions[0][1], r.text), repr(r.text[:60]), "tokens", len(engine.tokens), "short", getattr(engine, "short", None), flush=True)
second = build_prose_prompt(tok, "single", 4096, 0.5, 1)
marks = []
t = time.perf_counter()
orig = engine.expect
def timed(n, reread=None):
    s = time.perf_counter(); out = orig(n, reread); marks.append((out, time.perf_counter() - s)); return out
engine.expect = timed
r = conv.ask(second.content)
total = time.perf_counter() - t
print("turn 3 (4K document and its question):", round(total, 1), "s; read again:", [(a, round(b, 1)) for a, b in marks if a],
      "score", score(second.answers, r.text), repr(r.text[:60]), "tokens", len(engine.tokens), "short", getattr(engine, "short", None), flush=True)
