"""Probe behind BENCHMARKS.md, "Replying far to a pasted document only": the reply to a pasted 16K document (the
dialogue's first turn, greedy, 64 tokens) under variants of the settings that act from the paste's last chunk on
(its vote, the shared blocks, decoding distances), each from one shared reading of the document up to the last
2048-token boundary before that chunk (the chunks are those of the dialogue's own reading: the preset's replies
equal the dialogue records'). The variants are set on the live memory without the schema's checks (no vote with
its tally settings left as they are), which a probe may do and a config may not.

    OMP_NUM_THREADS=1 python docs/bench/paste_reply_probe.py OUT.jsonl SEED [LENGTH]
"""
import json, sys, time, torch
from inf_llm.bench.prose_tasks import build_prose_prompt, dialogue_of
from inf_llm.bench.prose import PASTE_REPLY_TOKENS
from inf_llm.generation.sampling import SamplingParams
from probe_setup import done_cases, load_engine, read_to_last_chunk, unchecked, use

torch.set_num_threads(1)
out, seed = sys.argv[1], int(sys.argv[2])
length = int(sys.argv[3]) if len(sys.argv) > 3 else 16384
VARIANTS = {
    "preset": {},
    "novote": {"prompt_end_blocks": 0},
    "noshared": {"shared_blocks": 0},
    "novote_noshared": {"prompt_end_blocks": 0, "shared_blocks": 0},
    "dec512": {"decode_memory_distance": 512},
    "sinks_voted_near": {"num_sink_tokens": 32, "sink_memory_distance": 64, "voted_memory_distance": 64,
                         "sink_memory_with_voted": True},
    "nosink_near": {"decode_memory_distance": 512, "voted_memory_distance": 128},
}
tok, base, engine, fmt = load_engine()

done = done_cases(out)
params = SamplingParams(temperature=0.0, max_new_tokens=PASTE_REPLY_TOKENS, min_new_tokens=1)
for task in ("single", "multikey", "multivalue", "multiquery", "twohop"):
    for depth in (0.1, 0.5, 0.9):
        todo = [v for v in VARIANTS if (task, depth, v) not in done]
        if not todo:
            continue
        prompt = build_prose_prompt(tok, task, length, depth, seed)
        paste = dialogue_of(prompt).paste
        ids = fmt.render([{"role": "user", "content": paste}], add_generation_prompt=True)
        split, snap, t_pre = read_to_last_chunk(engine, base, ids)
        for v in todo:
            engine.restore(snap)
            use(engine, unchecked(base, **VARIANTS[v]))
            t1 = time.time()
            text = "".join(s.text for s in engine.generate(ids[split:], params))
            rec = {"task": task, "depth": depth, "seed": seed, "length": length, "variant": v, "reply": text,
                   "prefix_s": round(t_pre, 1), "s": round(time.time() - t1, 1)}
            print(json.dumps(rec)[:260], flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
