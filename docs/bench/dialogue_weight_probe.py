"""Probe behind BENCHMARKS.md, "A document pasted, then asked about": where the reply's second step puts its
attention when the question is asked in the next message. The dialogue of a 4K case up to the question, its first
reply token fed, then the second step traced (`InfLLMMemory.start_trace`, with the local window's weight per key
kept here): per layer, the weight on the model's first reply, on the question's message, on the rest of the window,
and on memory; with the top next tokens. Under the preset and each given set of settings.

    OMP_NUM_THREADS=1 python docs/bench/dialogue_weight_probe.py TASK DEPTH SEED ["KEY=VALUE ..."]
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
from inf_llm.kernels import reference as ref
from inf_llm.memory.retrieval_trace import RetrievalTrace

LOCAL: list = []
record = RetrievalTrace.record


def record_with_window(self, layer, start, q_local, k_local, q_global, k_global, scale, *, local_offset, **kw):
    record(self, layer, start, q_local, k_local, q_global, k_global, scale, local_offset=local_offset, **kw)
    num_memory, window = kw["num_memory"], kw["window"]
    _, lse_l = ref.attend(q_local, k_local, k_local, scale, mask="band", q_offset=local_offset, window=window)
    _, lse_g = ref.attend(q_global, k_global, k_global, scale, mask="complement", q_offset=local_offset + num_memory,
                          window=window)
    mass = ref.key_mass(q_local, k_local, scale, torch.logaddexp(lse_l, lse_g), mask="band", q_offset=local_offset,
                        window=window)[0].sum(0) / q_local.shape[1]
    LOCAL.append((layer, start - local_offset, mass))


RetrievalTrace.record = record_with_window
torch.set_num_threads(1)
from inf_llm.model.loading import load_model  # noqa: E402

model, tok = load_model(None, device="cpu")
task, depth, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
fmt = ChatFormat.create(tok)
dialogue = dialogue_of(build_prose_prompt(tok, task, 4096, depth, seed))
for sets in [[]] + [s.split() for s in sys.argv[4:]]:
    engine = Engine(model, tok, load_config(default_preset_for(None)).config.replace(**parse_overrides(sets)))
    conversation = Conversation(engine, fmt, SamplingParams(temperature=0.0, max_new_tokens=64))
    pasted = conversation.ask(dialogue.paste)
    before = len(engine.tokens)
    target = fmt.render(conversation.messages + [{"role": "user", "content": dialogue.questions[0][0]}],
                        add_generation_prompt=True)
    first_reply = fmt.render(conversation.messages[:1], add_generation_prompt=True)
    reply_span = (len(first_reply), before - 2)  # the first reply's tokens (its end-of-turn closing left out)
    engine.feed(target[before:-1])
    logits = engine.feed(target[-1:])
    first = int(logits.argmax())
    LOCAL.clear()
    trace = engine.memory.start_trace()
    logits = engine.feed([first])
    engine.memory.stop_trace()
    top = torch.topk(torch.softmax(logits, -1), 3)
    print(sets, repr(tok.decode([first])), "then", [(tok.decode([int(i)]), round(float(p), 3)) for p, i in zip(*top)])
    print("layer  first-reply  question  other-window  memory")
    for chunk, (layer, origin, mass) in zip(trace.chunks, LOCAL):
        pos = torch.arange(origin, origin + mass.shape[0])
        on = lambda a, b: float(mass[(pos >= a) & (pos < b)].sum())  # noqa: E731
        reply, question = on(*reply_span), on(before, len(target) + 1)
        memory = chunk.sink_weight + float(chunk.token_weight.sum()) + chunk.remainder_weight
        print(f"{layer:5d}  {reply:11.3f}  {question:8.3f}  {float(mass.sum()) - reply - question:12.3f}  {memory:6.3f}")
