"""Probe behind BENCHMARKS.md, "A reply's first steps far": does decoding only a reply's first N steps with memory at
512 (then as the preset, every voted run at 128) keep what replying far gives the reply to a pasted document (a
reply that addresses the user instead of looping or copying the system prompt) without what it costs a question
asked in the same message (a two-hop answer that stops at the first hop: "... is kept is 3.")?

Each case's prompt is read once up to the last 2048-token boundary before its last chunk (the chunks are those of
the benchmark's own reading), then the rest of the prompt and the reply under each variant. The switch from far to
near is made on the live memory between two decoding steps, which a probe may do and a config may not.

    OMP_NUM_THREADS=1 python docs/bench/reply_far_steps_probe.py OUT.jsonl MODE SEED TASKS [LENGTH]

MODE: `message` (the document and its question as one message, scored as `prose` scores it) or `paste` (the
document alone, the dialogue's first turn, 64 tokens of reply). TASKS: comma-separated.
"""
import json, sys, time, torch
from inf_llm.bench.prose import PASTE_REPLY_TOKENS
from inf_llm.bench.prose_tasks import MAX_NEW_TOKENS, build_prose_prompt, dialogue_of, score
from inf_llm.generation.sampling import SamplingParams
from probe_setup import done_cases, load_engine, read_to_last_chunk, unchecked, use

torch.set_num_threads(1)
out, mode, seed, tasks = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
length = int(sys.argv[5]) if len(sys.argv) > 5 else 16384
FAR = {"decode_memory_distance": 512, "voted_memory_distance": 128}
NEAR = {"voted_memory_distance": 128}
# name -> (settings of the first `steps` decoding steps, their number, settings after them)
VARIANTS = {"preset": ({}, 0, {}), "far": (FAR, 10**9, FAR), "far4": (FAR, 4, NEAR), "far8": (FAR, 8, NEAR),
            "far16": (FAR, 16, NEAR)}
tok, base, engine, fmt = load_engine()

done = done_cases(out)
for task in tasks:
    for depth in (0.1, 0.5, 0.9):
        todo = [v for v in VARIANTS if (task, depth, v) not in done]
        if not todo:
            continue
        prompt = build_prose_prompt(tok, task, length, depth, seed)
        if mode == "paste":
            ids = fmt.render([{"role": "user", "content": dialogue_of(prompt).paste}], add_generation_prompt=True)
            answers, max_new = (), PASTE_REPLY_TOKENS
        else:
            ids, answers, max_new = prompt.ids, prompt.answers, MAX_NEW_TOKENS[task]
        split, snap, t_pre = read_to_last_chunk(engine, base, ids)
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new, min_new_tokens=1)
        for v in todo:
            first, steps, after = VARIANTS[v]
            engine.restore(snap)
            use(engine, unchecked(base, **first))
            t1 = time.time()
            text, count = "", 0
            for step in engine.generate(ids[split:], params):
                text += step.text
                count += 1
                if count == steps:  # steps 0 .. steps-1 (feeding the prompt's last token, then tokens 1 ..) were far
                    use(engine, unchecked(base, **after))
            rec = {"mode": mode, "task": task, "depth": depth, "seed": seed, "length": length, "variant": v,
                   "reply": text, "score": score(answers, text) if answers else None, "prefix_s": round(t_pre, 1),
                   "s": round(time.time() - t1, 1)}
            print(json.dumps(rec)[:300], flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
