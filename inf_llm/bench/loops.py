"""Does a first chat loop? Everyday prompts at candidate sampling defaults, counting replies that repeat themselves.

`python -m inf_llm.bench loops` asks each prompt as the first message of a fresh chat (the chat's own path:
`chat.conversation.Conversation`, the tokenizer's chat template and its system message, the model's default
preset), with a few seeds per candidate (one for greedy), and prints per candidate how many replies loop. It is
one of the two measurements behind the chat's defaults (`inf_llm.generation.sampling.CHAT_DEFAULTS`); the other is
quoting a number from a document, which a penalty must not break (`python -m inf_llm.bench prose
--repetition-penalty 1.2`; BENCHMARKS.md has both).

A reply loops (`loops`) when the same run of `NGRAM` tokens comes back `NGRAM_REPEATS` or more times without
overlapping ("Bonjour! (Bonjour!)" five times), or when the same sentence of at least `SENTENCE_WORDS` words comes
back (a list that restates its first item).
"""

from __future__ import annotations

import re
import statistics
from collections import Counter

PROMPTS = (
    "Say hello in French.",
    "What is the capital of Italy?",
    "Give me three tips for sleeping better.",
    "Write a haiku about the sea.",
    "How do I boil an egg?",
    "Explain what a computer is in two sentences.",
    "What should I cook for dinner tonight?",
    "Tell me a fun fact about cats.",
)

# name -> SamplingParams fields. "generation config": the embedded model's generation config sets no sampling
# field, which transformers' generate reads as greedy decoding. A penalty here is the engine's (`RepeatCounter`: on
# what the reply repeats beyond the conversation's own count); before 2026-12-01 it covered every repeat of the
# reply's own tokens, and result files keep those runs under the names without "beyond the context".
CANDIDATES = {
    "T=0.7 (previous default)": dict(temperature=0.7),
    "greedy (its generation config)": dict(temperature=0.0),
    "greedy, penalty 1.2 beyond the context": dict(temperature=0.0, repetition_penalty=1.2),
    "T=0.7, penalty 1.1 beyond the context": dict(temperature=0.7, repetition_penalty=1.1),
    "T=0.7, penalty 1.2 beyond the context (the default)": dict(temperature=0.7, repetition_penalty=1.2),
    "T=0.3, penalty 1.2 beyond the context": dict(temperature=0.3, repetition_penalty=1.2),
    "T=0.2, top-p 0.9 (model card)": dict(temperature=0.2, top_p=0.9),
}

KIND = "loops"
NGRAM, NGRAM_REPEATS = 4, 3
SENTENCE_WORDS = 4


def loops(token_ids: list[int], text: str) -> bool:
    """True when a reply repeats itself (see the module's docstring)."""
    for start in range(len(token_ids) - NGRAM + 1):
        gram = token_ids[start : start + NGRAM]
        count, i = 0, 0
        while i <= len(token_ids) - NGRAM:
            if token_ids[i : i + NGRAM] == gram:
                count, i = count + 1, i + NGRAM
            else:
                i += 1
        if count >= NGRAM_REPEATS:
            return True
    sentences = [" ".join(s.lower().split()) for s in re.split(r"[.!?\n]+", text)]
    counts = Counter(s for s in sentences if len(s.split()) >= SENTENCE_WORDS)
    return any(n >= 2 for n in counts.values())


def add_arguments(parser) -> None:
    parser.add_argument("--seeds", type=int, default=2, help="seeds per sampled candidate (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--candidates", default=None,
                        help="comma-separated candidate numbers to run, 1-based (default: all): " +
                        "; ".join(f"{i}: {name}" for i, name in enumerate(CANDIDATES, 1)))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: %(default)s: on a shared 2-core machine one thread decoded 5x "
                             "faster than two)")
    parser.add_argument("--show", action="store_true", help="print every looping reply")
    parser.add_argument("--out", default="bench_results", help="folder of the results (default: %(default)s)")
    parser.add_argument("--name", default="loops", help="result file name, without .jsonl (default: %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="start a new result file (the old one is kept as .bak)")


def run(args) -> int:
    from pathlib import Path

    from chat.chat_format import ChatFormat
    from chat.conversation import Conversation
    from inf_llm.bench.results import ResultLog, machine_info
    from inf_llm.config.files import load_config
    from inf_llm.config.presets import default_preset_for
    from inf_llm.generation.engine import Engine
    from inf_llm.generation.sampling import SamplingParams
    from inf_llm.model.loading import load_model

    import torch

    torch.set_num_threads(args.threads)
    names = list(CANDIDATES)
    if args.candidates:
        names = [names[int(i) - 1] for i in args.candidates.split(",")]
    model, tokenizer = load_model()
    engine = Engine(model, tokenizer, load_config(default_preset_for(None)).config)
    chat_format = ChatFormat.create(tokenizer)
    log = ResultLog(Path(args.out) / f"{args.name}.jsonl", fresh=args.fresh)
    machine = machine_info()
    for name in names:
        settings = CANDIDATES[name]
        seeds = [0] if settings.get("temperature", 1.0) == 0 else list(range(args.seeds))
        for prompt in PROMPTS:
            for seed in seeds:
                case = {"candidate": name, "settings": settings, "prompt": prompt, "seed": seed,
                        "max_new_tokens": args.max_new_tokens}
                if log.done(KIND, case):
                    continue
                params = SamplingParams(**settings, max_new_tokens=args.max_new_tokens, seed=seed)
                engine.reset()
                conversation = Conversation(engine, chat_format, params)
                ids: list[int] = []
                reply = conversation.ask(prompt, on_step=lambda step: ids.append(step.token_id))
                looped = loops(ids, reply.text)
                log.append(KIND, case, reply=reply.text, tokens=len(ids), finish=reply.finish_reason, loops=looped,
                           decode_ms_per_token=reply.decode_ms_per_token, machine=machine)
                print(f"{name} | seed {seed} | {prompt} -> {len(ids)} tokens, {reply.finish_reason}"
                      + (", LOOPS" if looped else ""), flush=True)
    records = [r for r in log.records_of(KIND) if r["case"]["candidate"] in names
               and r["case"]["max_new_tokens"] == args.max_new_tokens]
    print()
    print(table(records, names))
    if args.show:
        for r in records:
            if r["loops"]:
                print(f"\n[{r['case']['candidate']}, seed {r['case']['seed']}] {r['case']['prompt']}\n{r['reply']}")
    return 0


def table(records: list[dict], names: list[str]) -> str:
    """Markdown: per candidate, replies, looping replies, replies cut at max_new_tokens, median tokens."""
    lines = ["| candidate | replies | looping | cut at max tokens | median tokens |", "|---|---|---|---|---|"]
    for name in names:
        rows = [r for r in records if r["case"]["candidate"] == name]
        if not rows:
            continue
        looping = sum(r["loops"] for r in rows)
        cut = sum(r["finish"] == "length" for r in rows)
        lines.append(f"| {name} | {len(rows)} | {looping} ({100 * looping / len(rows):.0f}%) | {cut} | "
                     f"{statistics.median(r['tokens'] for r in rows):.0f} |")
    return "\n".join(lines)
