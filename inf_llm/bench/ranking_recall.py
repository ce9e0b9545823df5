"""Recall of an approximate first stage against brute-force ranking, on a long read's real block summaries.

    python -m inf_llm.bench.ranking_recall --summaries FOLDER [--ranks 16,32,64] [--candidates 1024,2048,4096]

Issue 15's exact group index does not prune on this model (BENCHMARKS.md), so a first stage whose cost does not
grow with every byte of every summary has to be approximate, and its recall measured on real summaries. The
candidate measured here is a low-rank projection of the summaries. A block's bound score is linear in its summary
s (flattened, R x D values): score = q . s. Per layer, the principal directions V (r of R x D) of the first
`--calibration` blocks' summaries and their mean m give each block a code z = V (s - m) of r 16-bit values, and
q . s ~ q . m + (V q) . z, which reads r values per block instead of R x D (r = 32 of the embedded model's
384: a twelfth). The best `C` blocks by that estimate are then scored exactly (`block_scores`) and the top k
chosen among them (the functions `LayerMemory` ranks with under `ranking_code_rank`, its codes stored as
float16 values); recall is the share of brute force's top k found, for the preset's k = 56 (the blocks the
bounds keep) and k = 512 (the second stage's shortlist).

`--pool C[,C...] --pool-every E[,E...]` measures `reply_pool_blocks` instead: the queries are those of whole replies
(the embedded model answering prose benchmark prompts, `capture_replies`), and at each step of a reply the pool is
the best C blocks of the last step that scored every block (the first, then every E-th); recall is the share of
brute force's top k (at that step) inside the pool, over every layer and step that scores only the pool.

FOLDER holds a saved session's summary tiers (`layer-NNN-reprs`, as `inf_llm.sessions` writes them; the long
read's session is removed after its record, so keep one with `long-read --keep-sessions` or hard links). The
queries are real ones: the decoding steps' ranking queries of the embedded model reading 4K tokens of the prose
corpus (`ranking_index.capture`), which rank the long read's summaries as a later question would.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from inf_llm.memory.ranking import block_scores, code_basis, code_shortlist, select_blocks, summary_codes, summary_rows


def approximate_select(summaries: torch.Tensor, query: torch.Tensor, num_kv_heads: int, summary_absmax: torch.Tensor,
                       block_codes: torch.Tensor, basis: torch.Tensor, candidates: int, k: int) -> torch.Tensor:
    """The top k blocks (ascending ids) among the `candidates` best by the codes' estimate, scored exactly: what
    `LayerMemory` chooses with ranking_code_rank (the same functions)."""
    chosen = code_shortlist(block_codes, basis, query, candidates)
    exact = block_scores(summary_rows(summaries, chosen), query, num_kv_heads, False, summary_absmax)
    return chosen[select_blocks(exact, k)].sort().values


def recall(summaries: torch.Tensor, queries: list[torch.Tensor], num_kv_heads: int, ranks: list[int],
           candidates: list[int], ks: tuple[int, ...] = (56, 512), calibration: int = 2048) -> list[dict]:
    """For one layer: per rank and candidate count, the recall of brute force's top k for each k, per query."""
    absmax = summaries.abs().max().float()
    # Brute force's choices, once per query and k.
    wanted = [{k: set(select_blocks(block_scores(summaries, query, num_kv_heads, False, absmax), k).tolist())
               for k in ks} for query in queries]
    rows = []
    for rank in ranks:
        basis = code_basis(summaries[:calibration], rank)
        block_codes = summary_codes(summaries, basis)
        for count in candidates:
            for query, want in zip(queries, wanted):
                row = {"rank": rank, "candidates": count}
                for k in ks:
                    got = approximate_select(summaries, query, num_kv_heads, absmax, block_codes, basis,
                                             max(count, k), k)
                    row[f"recall_{k}"] = len(want[k] & set(got.tolist())) / min(k, summaries.shape[0])
                rows.append(row)
    return rows


def ranking_ms(summaries: torch.Tensor, queries: list[torch.Tensor], num_kv_heads: int, rank: int, count: int,
               lengths: list[int], shortlist: int = 512, calibration: int | None = None) -> list[dict]:
    """For one layer and each prefix of `lengths` blocks: ms per ranking (scores, then the best `shortlist`) by
    brute force and with codes (`LayerMemory`'s path: the codes' best `count`, calibrated on the first
    `calibration` blocks, default `count`, used beyond that many), the mean over the queries."""
    calibration = count if calibration is None else calibration
    absmax = summaries.abs().max().float()
    basis = code_basis(summaries[:calibration], rank)
    block_codes = summary_codes(summaries, basis)
    rows = []
    for n in lengths:
        part, codes_part = summaries[:n], block_codes[:n]
        timing = {"blocks": n, "brute_ms": 0.0, "codes_ms": 0.0}
        for query in queries:
            start = time.perf_counter()
            select_blocks(block_scores(part, query, num_kv_heads, False, absmax), shortlist)
            timing["brute_ms"] += (time.perf_counter() - start) * 1e3 / len(queries)
            start = time.perf_counter()
            if n > count:
                approximate_select(part, query, num_kv_heads, absmax, codes_part, basis, count, shortlist)
            else:
                select_blocks(block_scores(part, query, num_kv_heads, False, absmax), shortlist)
            timing["codes_ms"] += (time.perf_counter() - start) * 1e3 / len(queries)
        rows.append(timing)
    return rows


REPLY_CASES = (("single", 0.5), ("multiquery", 0.1))  # prose prompts (4K tokens, seed 0) whose replies are captured


def capture_replies(max_new_tokens: int = 40, log=print) -> tuple[list[dict[int, list[torch.Tensor]]], int]:
    """The embedded model (its preset) answering the `REPLY_CASES` prompts greedily: per reply, each layer's
    ranking query at every decoding step that ranked, in order; and the model's KV heads."""
    from inf_llm import load_engine
    from inf_llm.bench.prose_tasks import build_prose_prompt
    from inf_llm.generation.sampling import SamplingParams
    from inf_llm.memory.ranking import ranking_query

    engine = load_engine()
    cfg, recorded = engine.config, {}
    for layer in engine.memory.layers:
        def recording(q, layer=layer, rank=layer._rank):
            if q.shape[1] == 1:
                recorded.setdefault(layer.index, []).append(
                    ranking_query(q, cfg.block_ranking, layer.shape.num_kv_heads))
            return rank(q)
        layer._rank = recording
    replies = []
    for task, depth in REPLY_CASES:
        prompt = build_prose_prompt(engine.tokenizer, task, 4096, depth, 0)
        engine.reset()
        engine.feed(prompt.ids[:-1])
        recorded.clear()
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
        text = "".join(step.text for step in engine.generate(prompt.ids[-1:], params))
        log(f"{task} reply of {len(recorded[0])} steps: {text!r}")
        replies.append(dict(recorded))
    return replies, engine.memory.layers[0].shape.num_kv_heads


def pool_recall(summaries: torch.Tensor, steps: list[torch.Tensor], num_kv_heads: int, sizes: list[int],
                every: list[int], ks: tuple[int, ...] = (56, 512)) -> dict[tuple[int, int, int], list[float]]:
    """For one layer and one reply's queries: per (pool size C, pool term E, k), the recall of brute force's top k
    within the pool at each step that scores only the pool (the pool: the C best of the step that formed it)."""
    absmax = summaries.abs().max().float()
    scores = [block_scores(summaries, query, num_kv_heads, False, absmax) for query in steps]
    tops = [{k: set(select_blocks(s, k).tolist()) for k in ks} for s in scores]
    pools = [{c: set(select_blocks(s, c).tolist()) for c in sizes} for s in scores]
    out = {(c, e, k): [] for c in sizes for e in every for k in ks}
    for t in range(len(steps)):
        for e in every:
            formed = t - t % e
            if formed == t:
                continue
            for c in sizes:
                for k in ks:
                    out[(c, e, k)].append(len(tops[t][k] & pools[formed][c]) / k)
    return out


def pool_ms(summaries: torch.Tensor, steps: list[torch.Tensor], num_kv_heads: int, size: int, every: int,
            shortlist: int = 512) -> tuple[float, float]:
    """For one layer: ms per decoded token of the first stage (scores, then the best `shortlist`), brute force and
    with a pool of `size` renewed every `every` steps (the renewing step scores every block and chooses the pool
    too; the next copies the pool's summaries out, as `LayerMemory` does), each the mean over the steps. Up to
    `size` blocks no pool is formed: both are brute force's time."""
    absmax = summaries.abs().max().float()
    brute = pooled = 0.0
    pool = rows = None
    forms_pool = summaries.shape[0] > size
    for t, query in enumerate(steps):
        start = time.perf_counter()
        select_blocks(block_scores(summaries, query, num_kv_heads, False, absmax), shortlist)
        brute += time.perf_counter() - start
        if not forms_pool:
            continue
        start = time.perf_counter()
        if t % every == 0:
            scores = block_scores(summaries, query, num_kv_heads, False, absmax)
            pool, rows = select_blocks(scores, size), None
            select_blocks(scores, shortlist)
        else:
            if rows is None:
                rows = summary_rows(summaries, pool).contiguous()
            scores = block_scores(rows, query, num_kv_heads, False, absmax)
            pool[select_blocks(scores, shortlist)]
        pooled += time.perf_counter() - start
    if not forms_pool:
        pooled = brute
    return brute * 1e3 / len(steps), pooled * 1e3 / len(steps)


def read_summaries(folder: Path, layer: int) -> torch.Tensor:
    """A layer's summaries (N, R, D) from a session's tier, as saved."""
    from inf_llm.storage.disk_tier import DiskTier

    tier = DiskTier.open(folder / f"layer-{layer:03d}-reprs", durable=False)
    try:
        n = len(tier)
        rows = tier.layout.rows(tier.read_prefix(n))
    finally:
        tier.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summaries", type=Path, required=True, help="a folder of layer-NNN-reprs tiers")
    parser.add_argument("--ranks", default="16,32,64")
    parser.add_argument("--candidates", default="1024,2048,4096")
    parser.add_argument("--calibration", type=int, default=2048, help="blocks whose summaries give the directions")
    parser.add_argument("--queries", type=Path, default=None, help="cache of the captured queries (ranking_index)")
    parser.add_argument("--timing", default=None, metavar="BLOCKS",
                        help="instead of recall: ms per decoded token (all layers) ranking the first BLOCKS blocks "
                             "(comma-separated counts), brute force vs the codes of the first --ranks and "
                             "--candidates values; with --pool, the pool's recall and time on those prefixes")
    parser.add_argument("--pool", default=None, metavar="C",
                        help="instead of codes: the recall of reply pools of C blocks (comma-separated sizes)")
    parser.add_argument("--pool-every", default="8", metavar="E",
                        help="with --pool: the ranked steps one pool serves (comma-separated)")
    args = parser.parse_args(argv)
    from inf_llm.bench.ranking_index import capture

    torch.set_num_threads(1)
    if args.pool is not None:
        _pool_main(args)
        return
    if args.queries is not None and args.queries.is_file():
        checkpoint = torch.load(args.queries, weights_only=False)[0]
    else:
        checkpoint = capture([4096], args.queries, log=lambda m: print(m, flush=True))[0]
    hkv = checkpoint["num_kv_heads"]
    ranks = [int(x) for x in args.ranks.split(",")]
    counts = [int(x) for x in args.candidates.split(",")]
    layers = sorted(int(p.name[6:9]) for p in args.summaries.glob("layer-*-reprs"))
    if not layers:
        raise SystemExit(f"{args.summaries} holds no layer-NNN-reprs tiers (a saved session's generation folder does)")
    if args.timing is not None:
        lengths = [int(x) for x in args.timing.split(",")]
        per_layer = []
        for layer in layers:
            flat = read_summaries(args.summaries, layer)
            summaries = flat.view(flat.shape[0], 2 * hkv, -1)
            queries = [c["query"] for c in checkpoint["queries"] if c["layer"] == layer and c["tokens"] == 1]
            per_layer.append(ranking_ms(summaries, queries, hkv, ranks[0], counts[0], [min(n, summaries.shape[0])
                                                                                       for n in lengths]))
        print(f"ranking ms per decoded token, {len(layers)} layers (sum), one thread; codes r = {ranks[0]}, "
              f"C = {counts[0]}; the best 512 chosen")
        print("| blocks per layer | brute force ms | codes ms | codes / brute |")
        print("|---:|---:|---:|---:|")
        for i, n in enumerate(lengths):
            brute = sum(rows[i]["brute_ms"] for rows in per_layer)
            coded = sum(rows[i]["codes_ms"] for rows in per_layer)
            blocks_n = per_layer[0][i]["blocks"]
            print(f"| {blocks_n:,} | {brute:.1f} | {coded:.1f} | {coded / brute:.2f} |")
        return
    rows, blocks = [], 0
    for layer in layers:
        flat = read_summaries(args.summaries, layer)
        summaries = flat.view(flat.shape[0], 2 * hkv, -1)
        blocks = summaries.shape[0]
        queries = [c["query"] for c in checkpoint["queries"] if c["layer"] == layer and c["tokens"] == 1]
        rows += [{**row, "layer": layer} for row in recall(summaries, queries, hkv, ranks, counts,
                                                              calibration=args.calibration)]
    row_values = summaries.shape[1] * summaries.shape[2]
    print(f"{len(layers)} layers, {blocks} blocks each, {len(rows) // (len(ranks) * len(counts))} decoding queries; "
          f"recall of brute force's top k; read = (codes + candidates' summaries) / all summaries")
    print("| rank | candidates | recall top 56 (min) | recall top 512 (min) | read |")
    print("|---:|---:|---|---|---:|")
    for rank in ranks:
        for count in counts:
            sel = [r for r in rows if r["rank"] == rank and r["candidates"] == count]
            r56, r512 = [r["recall_56"] for r in sel], [r["recall_512"] for r in sel]
            read = (2 * rank + min(count, blocks) * row_values / blocks) / row_values  # codes float32, rows 16-bit
            print(f"| {rank} | {count} | {statistics.mean(r56):.3f} ({min(r56):.2f}) | "
                  f"{statistics.mean(r512):.3f} ({min(r512):.2f}) | {read:.3f} |")


def pool_read(size: int, every: int, blocks: int) -> float:
    """The share of a layer's summaries the first stage scores per decoded token under a reply's pool: every block
    once per `every` ranked steps and the pool at the others; 1.0 up to `size` blocks, where no pool is formed
    (`LayerMemory._form_pool`) and every step ranks every block."""
    if blocks <= size:
        return 1.0
    return ((every - 1) * size / blocks + 1) / every


def _pool_main(args) -> None:
    sizes = [int(x) for x in args.pool.split(",")]
    every = [int(x) for x in args.pool_every.split(",")]
    layers = sorted(int(p.name[6:9]) for p in args.summaries.glob("layer-*-reprs"))
    if not layers:
        raise SystemExit(f"{args.summaries} holds no layer-NNN-reprs tiers (a saved session's generation folder does)")
    replies, hkv = capture_replies(log=lambda m: print(m, flush=True))
    ks = (56, 512)
    # --timing: the same on the first BLOCKS blocks of the memory (a shorter read's summaries), one table a prefix.
    prefixes = [int(x) for x in args.timing.split(",")] if args.timing is not None else [None]
    totals = {(n, c, e, k): [] for n in prefixes for c in sizes for e in every for k in ks}
    timing = {(n, c, e): [0.0, 0.0] for n in prefixes for c in sizes for e in every}
    blocks = {}
    for layer in layers:
        flat = read_summaries(args.summaries, layer)
        whole = flat.view(flat.shape[0], 2 * hkv, -1)
        for n in prefixes:
            summaries = whole if n is None else whole[:n]
            blocks[n] = summaries.shape[0]
            pooled_sizes = [c for c in sizes if c < blocks[n]]  # up to C blocks no pool is formed
            for reply in replies:
                for (c, e, k), values in pool_recall(summaries, reply[layer], hkv, pooled_sizes, every, ks).items():
                    totals[(n, c, e, k)] += values
                for c in sizes:
                    for e in every:
                        brute, pooled = pool_ms(summaries, reply[layer], hkv, c, e)
                        sums = timing[(n, c, e)]
                        sums[0] += brute / len(replies)
                        sums[1] += pooled / len(replies)
    for n in prefixes:
        print(f"{len(layers)} layers, {blocks[n]} blocks each, {len(replies)} replies; recall of brute force's top k "
              f"within the pool at the steps that score only the pool; read = summaries scored per step / all (the "
              f"pool, and every block once per E steps)")
        print("ms: the first stage per decoded token, all layers, one thread (scores and the best 512; brute force / "
              "the pool, the renewing steps included; up to C blocks no pool is formed: brute force's own path)")
        print("| blocks per layer | pool C | every E | recall top 56 (5th percentile, lowest) | recall top 512 (5th "
              "percentile, lowest) | read | brute ms | pool ms |")
        print("|---:|---:|---:|---|---|---:|---:|---:|")
        for c in sizes:
            for e in every:
                cells = []
                for k in ks:
                    values = sorted(totals[(n, c, e, k)])
                    cells.append(f"{statistics.mean(values):.4f} ({values[len(values) // 20]:.3f}, {values[0]:.3f})"
                                 if values else "(no pool)")
                brute, pooled = timing[(n, c, e)]
                print(f"| {blocks[n]:,} | {c} | {e} | {cells[0]} | {cells[1]} | {pool_read(c, e, blocks[n]):.3f} | "
                      f"{brute:.1f} | {pooled:.1f} |")


if __name__ == "__main__":
    main()
