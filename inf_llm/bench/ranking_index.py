"""Exact top-k block ranking with a group index (`inf_llm.memory.block_index`) against brute force, on real memory.

    python -m inf_llm.bench.ranking_index --lengths 4K,16K,64K [--groups 8,16,32,64] [--cache FILE]

Builds the embedded model's memory once with its default preset (float16 key-bound summaries, top-64 of
16-token blocks) by feeding the prose corpus (`inf_llm.bench.corpus`) in one pass. At each length it captures
the ranking queries the layers really use: those of the next two 128-token chunks (a prompt being read) and of
four single decoded tokens, with each layer's summaries as they were. Then, per length, group size and query
kind, for every layer: ms per ranking call (median of `--repeats` calls) of brute force
(`select_blocks(block_scores(...))`) and of `BlockIndex.select`, and the fraction of summary bytes read
((group bounds + opened blocks) / all summaries). Every index selection is checked equal to brute force.

`--cache FILE` keeps the captured memory (feeding 64K tokens takes tens of minutes on 2 cores): a second run with
the same lengths reads it instead of feeding again.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from inf_llm.memory.ranking import block_scores, ranking_query, select_blocks

CHUNK_QUERIES = 2  # 128-token chunks captured per length
DECODE_QUERIES = 4  # single tokens captured per length


def parse_lengths(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        out.append(int(float(part[:-1]) * 1024) if part.endswith("K") else int(part))
    return sorted(out)


def capture(lengths: list[int], cache: Path | None = None, log=print) -> list[dict]:
    """Feed the corpus up to each length in turn; at each, record per layer the ranking queries of the next
    chunks and tokens and the summaries they ranked. Returns one dict per length (saved to `cache` after each)."""
    from inf_llm import load_engine
    from inf_llm.bench.corpus import load_paragraphs

    paragraphs = load_paragraphs()  # raises CorpusMissing with the command that fetches it
    engine = load_engine()
    cfg = engine.config
    ids = engine.tokenizer("\n\n".join(paragraphs), add_special_tokens=False)["input_ids"]
    need = max(lengths) + CHUNK_QUERIES * cfg.chunk_size + DECODE_QUERIES
    if len(ids) < need:
        raise SystemExit(f"the corpus has {len(ids)} tokens, fewer than the {need} that --lengths needs")
    layers = engine.memory.layers
    recorded: list[dict] = []
    recording = [False]

    def hook(layer):
        select = layer._select

        def recording_select(q):
            if recording[0] and layer.blocks.num_blocks:
                recorded.append({"layer": layer.index, "tokens": q.shape[1], "num_blocks": layer.blocks.num_blocks,
                                 "query": ranking_query(q, cfg.block_ranking, layer.shape.num_kv_heads),
                                 "absmax": layer._repr_absmax.clone()})
            return select(q)

        layer._select = recording_select

    for layer in layers:
        hook(layer)
    checkpoints, fed = [], 0
    for length in lengths:
        start = time.perf_counter()
        for s in range(fed, length, 2048):
            engine.feed(ids[s : min(s + 2048, length)])
        recording[0], recorded[:] = True, []
        engine.feed(ids[length : length + CHUNK_QUERIES * cfg.chunk_size])
        pos = length + CHUNK_QUERIES * cfg.chunk_size
        for t in range(DECODE_QUERIES):
            engine.feed(ids[pos + t : pos + t + 1])
        recording[0] = False
        fed = pos + DECODE_QUERIES
        # Summaries are append-only here (no rollback): rows below a query's num_blocks are what it ranked.
        checkpoints.append({"length": length, "queries": list(recorded), "num_kv_heads": layers[0].shape.num_kv_heads,
                            "reprs": [layer.reprs.clone() for layer in layers], "config": cfg,
                            "block_size": cfg.block_size})
        log(f"fed {length} tokens ({time.perf_counter() - start:.0f} s, {len(recorded)} ranking calls captured)")
        if cache is not None:
            torch.save(checkpoints, cache)
    return checkpoints


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(checkpoint: dict, group_sizes: list[int], repeats: int) -> list[dict]:
    """Per group size, query kind and layer: timings, fraction read, and the 1M proxy (see `main`)."""
    from inf_llm.memory.block_index import BlockIndex

    cfg, hkv = checkpoint["config"], checkpoint["num_kv_heads"]
    rows = []
    for group in group_sizes:
        for kind, is_kind in (("decode", lambda t: t == 1), ("chunk", lambda t: t > 1)):
            for layer, reprs in enumerate(checkpoint["reprs"]):
                queries = [c for c in checkpoint["queries"] if c["layer"] == layer and is_kind(c["tokens"])]
                if not queries:
                    continue
                fractions, rounds, proxy = [], [], []
                for c in queries:
                    s = reprs[: c["num_blocks"]]
                    k = cfg.topk_blocks if c["tokens"] == 1 else cfg.chunk_topk_blocks
                    index = BlockIndex.build(s, hkv, block_ranking=cfg.block_ranking, group_size=group)
                    scores = block_scores(s, c["query"], hkv, cfg.per_head_ranking, c["absmax"])
                    want = select_blocks(scores, k)
                    got = index.select(s, c["query"], k, per_head=cfg.per_head_ranking, summary_absmax=c["absmax"])
                    if not torch.equal(got, want):
                        raise AssertionError(f"layer {layer}: the index's selection differs from brute force")
                    fractions.append(index.last.fraction_read)
                    rounds.append(index.last.rounds)
                    # 1M proxy: at 1M tokens k = 64 of 65K blocks is the top 0.1%; here the best block's score
                    # stands for that k-th score. Read = group bounds + every group whose bound reaches it.
                    upper = index.group_bounds(c["query"], cfg.per_head_ranking, c["absmax"], s)
                    open_groups = (upper >= scores.max().double()).any(0).sum().item()
                    proxy.append(index.last.bound_rows / group + min(1.0, open_groups * group / s.shape[0]))
                c = queries[0]
                s = reprs[: c["num_blocks"]]
                k = cfg.topk_blocks if c["tokens"] == 1 else cfg.chunk_topk_blocks
                index = BlockIndex.build(s, hkv, block_ranking=cfg.block_ranking, group_size=group)
                brute = _median_ms(lambda: select_blocks(block_scores(s, c["query"], hkv, cfg.per_head_ranking, c["absmax"]), k), repeats)
                indexed = _median_ms(lambda: index.select(s, c["query"], k, per_head=cfg.per_head_ranking, summary_absmax=c["absmax"]), repeats)
                rows.append({"length": checkpoint["length"], "group": group, "kind": kind, "layer": layer,
                             "blocks": c["num_blocks"], "brute_ms": brute, "index_ms": indexed,
                             "read": statistics.mean(fractions), "rounds": statistics.mean(rounds),
                             "proxy_1m": statistics.mean(proxy), "queries": len(queries)})
    return rows


def print_table(rows: list[dict], log=print) -> None:
    log(f"{'length':>7} {'kind':>6} {'G':>3} {'blocks':>6} {'brute ms':>9} {'index ms':>9} {'read':>6} "
        f"{'read min-max over layers':>24} {'rounds':>6} {'1M proxy':>8}")
    keys = sorted({(r["length"], r["kind"], r["group"]) for r in rows})
    for length, kind, group in keys:
        sel = [r for r in rows if (r["length"], r["kind"], r["group"]) == (length, kind, group)]
        reads = [r["read"] for r in sel]
        log(f"{length:>7} {kind:>6} {group:>3} {statistics.mean(r['blocks'] for r in sel):>6.0f} "
            f"{statistics.mean(r['brute_ms'] for r in sel):>9.3f} {statistics.mean(r['index_ms'] for r in sel):>9.3f} "
            f"{statistics.mean(reads):>6.3f} {min(reads):>11.3f} - {max(reads):<10.3f} "
            f"{statistics.mean(r['rounds'] for r in sel):>6.1f} {statistics.mean(r['proxy_1m'] for r in sel):>8.3f}")
    group = sorted({r["group"] for r in rows})[len({r["group"] for r in rows}) // 2]
    for length in sorted({r["length"] for r in rows}):
        per_layer = [f"{r['read']:.2f}" for r in rows if r["length"] == length and r["group"] == group and r["kind"] == "decode"]
        log(f"per layer, {length} tokens, G={group}, decode, fraction read: {' '.join(per_layer)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4K,16K,64K")
    parser.add_argument("--groups", default="2,4,16,32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = parse_lengths(args.lengths)
    checkpoints = None
    if args.cache is not None and args.cache.is_file():
        cached = {c["length"]: c for c in torch.load(args.cache, weights_only=False)}
        missing = [n for n in lengths if n not in cached]
        if missing:
            print(f"{args.cache} lacks lengths {missing}: measuring the cached ones only ({sorted(cached)})")
        checkpoints = [cached[n] for n in lengths if n in cached]
    if checkpoints is None:
        checkpoints = capture(lengths, args.cache, log=lambda m: print(m, flush=True))
    groups = [int(g) for g in args.groups.split(",")]
    rows = []
    with torch.no_grad():
        for checkpoint in checkpoints:
            rows += measure(checkpoint, groups, args.repeats)
    print(f"torch threads {torch.get_num_threads()}; ms per ranking call (one layer), mean over layers of the median "
          f"of {args.repeats} calls; read = (group bounds + opened blocks) / all summaries, exact selections checked")
    print_table(rows)


if __name__ == "__main__":
    main()
