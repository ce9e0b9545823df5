"""The context memory of one decoder layer and the attention of a chunk over it (docs/METHOD.md sections 1-3).

Per layer InfLLM keeps, with keys unrotated:

- the window: the most recent `local_window` tokens (`wide_window` in a conversation's first
  `wide_window_until` tokens), plus the chunk being processed;
- the sinks: the first `num_sink_tokens` tokens of the stream, once they have left the window;
- the remainder: evicted tokens that do not yet fill a block;
- the blocks: every `block_size` evicted tokens, in a `BlockStore`, each with representative vectors.

A chunk of queries at positions P..P+c-1 is computed as two partial attentions merged exactly:

- local: the window and the chunk, rotated at their distance, band mask ``0 <= rel < local_window``;
- global: sinks + retrieved blocks + remainder, and the chunk-window keys that fall out of a query's band
  (complement mask ``rel >= local_window``), all at the same distance `local_window` (the paper's l_L; the
  reference code uses l_L - 1). The complement mask is exact per query, so no key is attended twice: this is
  where the reference code's prefill bug lived.

`stream-llm` and `infinite-lm` keep the sinks and the window only; stream-llm places the sinks at their true
positions and the query just after the window, infinite-lm places them at distance `local_window`.
"""

from __future__ import annotations

import torch

from inf_llm.kernels.reference import finish_chunk_attention
from inf_llm.memory.layer_state import LayerState
from inf_llm.memory.ranking import (block_scores, code_shortlist, exact_block_scores, key_bounds, peak_block_scores,
                                    ranking_query, representatives, second_stage_choice, select_blocks,
                                    summary_rows, with_following)
from inf_llm.storage.block_ids import BlockIds


def run_positions(starts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Positions of keys in runs: starts (H, G) bool, True where a run begins (column 0 True). Every run's last
    key at L - 1 and its others before it in order, L the longest run's length; returns ((H, G) long, L)."""
    heads, g = starts.shape
    run = starts.long().cumsum(dim=1) - 1
    index = torch.arange(g, device=starts.device).expand(heads, g)
    ends = torch.zeros_like(run).scatter_reduce(1, run, index, reduce="amax", include_self=False)
    begins = torch.zeros_like(run).scatter_reduce(1, run, index, reduce="amin", include_self=False)
    remaining = ends.gather(1, run) - index
    longest = int((index - begins.gather(1, run)).max()) + 1
    return longest - 1 - remaining, longest


class LayerMemory(LayerState):
    """One layer's memory (`LayerState`) and the attention of a chunk of new tokens over it."""

    # --- attention --------------------------------------------------------------------------------------------

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Attend a run of new tokens and add them to the memory.

        q: (Hq, T, D), k, v: (Hkv, T, D), unrotated. Returns (Hq, T, D) float32.
        """
        step = self.config.chunk_size
        outs = [self._chunk(q[:, s : s + step], k[:, s : s + step], v[:, s : s + step], scale) for s in range(0, q.shape[1], step)]
        self._check_absmax()  # once per call: on CUDA each check waits for the device
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        cfg, ops = self.config, self.ops
        c = q.shape[1]
        # local_window, or wide_window for a chunk that ends within wide_window_until. A window narrower than the
        # one before leaves its oldest keys to the complement below (exact), and _evict moves them to memory.
        window = cfg.window_for(self.num_seen + c)
        self._window_append(k, v)
        loc_k = self.win_k[:, self.win_start : self.win_end]  # (Hkv, w + c, D): positions P-w .. P+c-1
        loc_v = self.win_v[:, self.win_start : self.win_end]
        w = loc_k.shape[1] - c
        first_pos = self.num_seen - w  # absolute position of loc_k[:, 0]

        # Local stage: exact relative positions inside the window. Rotations are computed in float32 and the
        # attention reads them in the memory's dtype, as the stock model does: 16-bit on a GPU (where float32
        # inputs would take the kernels' three-product TF32 path, several times slower), float32 on the CPU.
        dtype = self.dtype
        q_loc = self.rotary.rotate(q, w)[None].to(dtype)  # (1, Hq, c, D)
        k_loc = self.rotary.rotate(loc_k, 0)[None].to(dtype)  # (1, Hkv, w + c, D)

        # Global stage: memory keys, then the chunk-window keys that leave some query's band.
        n_comp = max(0, w + c - window)
        # The query rotated to the global distance (`far`): computed once, for ranking (rank_rotated) and the global stage.
        # the chunk's window unless memory_distance (decoding: decode_memory_distance, after a prompt of at least
        # decode_memory_distance_from tokens, for its first decode_memory_distance_steps steps; a reply's first step:
        # reply_start_distance)
        far = cfg.distance_for(c, reply_start=c == 1 and self._after_prompt, window=window,
                               prompt_tokens=self.prompt_tokens, reply_step=self.reply_steps)
        q_far = self.rotary.rotate_at(q, far) if cfg.method == "inf-llm" and cfg.rank_rotated else None
        if cfg.method == "inf-llm":
            # rank_distance: blocks are chosen with the query at that distance, and attended at `far`.
            rank_at = cfg.rank_distance if q_far is not None and cfg.rank_distance not in (None, far) else None
            chosen = self._select(self.rotary.rotate_at(q, rank_at) if rank_at is not None
                                  else q if q_far is None else q_far)
        else:
            chosen = None
        local = None
        if self.overlap:
            # Staged: the local partial is enqueued before the chosen blocks are waited for, so that on CUDA the
            # device computes it while the host keeps the cache's books and the side stream copies blocks in.
            local = ops.attend(q_loc, k_loc, loc_v[None], scale, mask="band", q_offset=w, window=window)
        if cfg.method != "inf-llm":
            n_comp = min(n_comp, max(0, cfg.num_sink_tokens - first_pos))  # only future sinks survive eviction
        glob_k, glob_v, num_memory = self._global_keys(chosen, loc_k[:, :n_comp], loc_v[:, :n_comp])
        q_glob = q_loc
        # memory_positions_until: the ordered (or runs) rule for chunks that end within the first N tokens only;
        # decode_memory_positions: the rule of decoding steps.
        positions = cfg.positions_for(c, self.num_seen + c)
        if glob_k.shape[1] > 0:
            if cfg.method == "stream-llm":
                # Sinks at their true positions, the query right after its full window (StreamingLLM's cache).
                q_pos = torch.clamp(torch.arange(self.num_seen, self.num_seen + c, device=q.device), max=cfg.num_sink_tokens + window - 1)
                q_glob = self.rotary.rotate_positions(q, q_pos)[None].to(dtype)
                glob_k = self.rotary.rotate(glob_k, 0).to(dtype)
            elif positions == "ordered":
                # The global keys in text order at positions 0..G-1, the query at far+G-1: the last global key
                # sits at distance `far`, as with shared positions, and the others follow their order.
                g = glob_k.shape[1]
                q_glob = self.rotary.rotate_at(q, far + g - 1)[None].to(dtype)
                glob_k = self.rotary.rotate(glob_k, 0).to(dtype)
            elif positions == "runs":
                # Each run of keys that are next to each other in the text in its order, the last key of every
                # run at distance `far`: a passage cut by a block boundary reads whole, and passages far apart
                # in the text are not read as one.
                positions, longest = run_positions(self._run_starts(chosen, glob_k.shape[1]))
                q_glob = self.rotary.rotate_at(q, far + longest - 1)[None].to(dtype)
                glob_k = self.rotary.rotate_positions(glob_k, positions).to(dtype)
            else:
                q_glob = (self.rotary.rotate_at(q, far) if q_far is None else q_far)[None].to(dtype)
                if cfg.sink_memory_distance is not None or cfg.voted_memory_distance is not None:
                    glob_k = self._place_near(glob_k, chosen, far, num_memory, first_pos)

        # Both stages in one exact softmax (the complement offset counts the memory keys placed before the window's).
        # The keys' attention mass feeds representatives only; key bounds are read off the keys.
        with_mass = cfg.method == "inf-llm" and cfg.block_ranking == "representatives"
        # decode_memory_bias: a decoding step's global logits lowered by the bias.
        bias = cfg.bias_for(c)
        offsets = dict(local_offset=w, global_offset=w + num_memory, window=window, with_mass=with_mass, global_bias=bias)
        if local is None:
            out, mass = ops.chunk_attention(q_loc, k_loc, loc_v[None], q_glob, glob_k[None], glob_v[None], scale, **offsets)
        else:
            out, mass = finish_chunk_attention(ops, local, q_loc, k_loc, q_glob, glob_k[None], glob_v[None], scale, **offsets)
        if with_mass:
            self.win_score[:, self.win_start : self.win_end] += mass[0]  # (Hq, w + c)
        if self.trace is not None and cfg.method == "inf-llm":
            parts = (self.sink_k.shape[1], num_memory - self.sink_k.shape[1] - self.rem_k.shape[1], self.rem_k.shape[1])
            self.trace.record(self.index, self.num_seen, q_loc, k_loc, q_glob, glob_k[None], scale, local_offset=w, num_memory=num_memory, window=window,
                              parts=parts, global_bias=bias, blocks=None if chosen is None else chosen.tensor(), scores=self._scores)
        self.num_seen += c
        self._after_prompt = c > 1
        self.reply_steps = 0 if c > 1 else self.reply_steps + 1
        self._evict()
        return out[0]

    def _select(self, q: torch.Tensor) -> BlockIds | None:
        """The top-k blocks for this chunk's queries (None when there are no blocks), on their way to the host."""
        if not self.blocks.num_blocks:
            return None
        cfg = self.config
        decoding = q.shape[1] == 1
        if decoding and self._reuse_left:
            # decode_rank_every: this step attends the last ranked step's blocks (ids stay valid: blocks only
            # append). A prompt's chunk ends the reuse, so the first step after a prompt always ranks.
            self._reuse_left -= 1
            return self._reused
        chosen = self._rank(q)
        if decoding and cfg.decode_rank_every > 1:
            self._reused, self._reuse_left = chosen, cfg.decode_rank_every - 1
        else:
            self._reused, self._reuse_left = None, 0
        return chosen

    def _rank(self, q: torch.Tensor) -> BlockIds:
        """The blocks this chunk's queries choose by ranking: one stage or two, forced blocks, following blocks."""
        cfg, hkv = self.config, self.shape.num_kv_heads
        if self.end_votes is not None:
            self._vote_prompt_end(q)
        if cfg.prompt_end_blocks and q.shape[1] > 1:
            self.end_baseline = q.float().contiguous()  # (the rotated query is a fresh tensor: kept, not copied)
        shared = None
        if self.shared_picks is not None:  # shared_blocks: a decoding step attends what other layers found
            if q.shape[1] == 1:
                shared = self.shared_picks.shared(self.num_seen)
            else:
                self.shared_picks.clear()
        query = ranking_query(q, cfg.block_ranking, hkv)
        n = self.blocks.num_blocks
        # Only the summaries of `candidates` (ascending ids) are scored when they are set; scores and the places
        # chosen among them are then the candidates'. reply_pool_blocks: a decoding step within a pool's term ranks
        # the pool and the blocks formed since; ranking_code_rank, beyond ranking_code_blocks blocks: the codes
        # shortlist the candidates.
        candidates = None
        pooled = q.shape[1] == 1 and self._pool_left > 0
        if pooled:
            self._pool_left -= 1
            scores = self._pool_scores(query)
            candidates = self._pool if self._pool_end == n else torch.cat(
                (self._pool, torch.arange(self._pool_end, n, device=self._pool.device)))
        else:
            if self._code_basis is not None and n > cfg.ranking_code_blocks:
                candidates = code_shortlist(self.codes, self._code_basis, query, cfg.ranking_code_blocks)
            summaries = self.reprs if candidates is None else summary_rows(self.reprs, candidates)
            scores = block_scores(summaries, query, hkv, cfg.per_head_ranking, self._repr_absmax)
            self._form_pool(scores, candidates, decoding=q.shape[1] == 1)
        if self.trace is not None:
            self._scores = scores if candidates is None else torch.full(
                (self.blocks.num_blocks,), -torch.inf, device=scores.device).index_put_((candidates,), scores)
        else:
            self._scores = None
        # A decoding step (one query) retrieves topk_blocks, a chunk of a prompt prefill_topk_blocks when set.
        topk = cfg.topk_blocks if q.shape[1] == 1 else cfg.chunk_topk_blocks
        rerank = cfg.rerank_blocks is not None and (cfg.rerank_chunks or q.shape[1] == 1)
        if rerank and self.blocks.num_blocks > topk:
            chosen = self._second_stage(q, scores, candidates, topk)
        else:
            chosen = select_blocks(scores, topk)
            if candidates is not None:
                chosen = candidates[chosen]
        # Blocks added to the ranking's choice, joined in one union: the oracle's forced blocks (per-layer ranking
        # only: `InfLLMMemory.force_blocks` checks), the shared blocks, the prompt end's.
        extra = []
        if self.forced_blocks is not None and self.num_seen + q.shape[1] > self.forced_from:
            extra.append(self.forced_blocks[self.forced_blocks < self.blocks.num_blocks])
        if shared is not None and shared.numel():
            extra.append(shared)
        # prompt_end_recent: ids of blocks yet to form, left out until they have (also in a session saved under the
        # setting and resumed without it, so the filter does not depend on it).
        if self.end_blocks is not None:
            extra.append(self.end_blocks[self.end_blocks < self.blocks.num_blocks])
        if extra:
            chosen = torch.cat((chosen, *(ids.to(chosen.device) for ids in extra))).unique(sorted=True)
        return BlockIds(with_following(chosen, cfg.following_blocks, self.blocks.num_blocks))

    def _form_pool(self, scores: torch.Tensor, candidates: torch.Tensor | None, decoding: bool) -> None:
        """reply_pool_blocks: after a decoding step ranked every block (or the codes' candidates), its best
        reply_pool_blocks by those scores are the pool of the next reply_pool_every - 1 ranked steps; a prompt's
        chunk ends the pool, so the first step of every reply ranks every block."""
        size = self.config.reply_pool_blocks
        if not decoding or size is None or self.blocks.num_blocks <= size:
            self._pool, self._pool_end, self._pool_left, self._pool_reprs = None, 0, 0, None
            return
        best = select_blocks(scores, min(size, scores.shape[0]))
        self._pool = best if candidates is None else candidates[best]  # ascending, as both are
        self._pool_end, self._pool_left = self.blocks.num_blocks, self.config.reply_pool_every - 1
        self._pool_reprs = None

    def _pool_scores(self, query: torch.Tensor) -> torch.Tensor:
        """A pooled step's first-stage scores: of the pool's blocks, then of those formed since. The pool's summaries
        are copied out once per pool (gathering 8,192 rows of 65,536 cost more than scoring them, at every step)."""
        if self._pool_reprs is None:
            self._pool_reprs = summary_rows(self.reprs, self._pool).contiguous()
        hkv, absmax = self.shape.num_kv_heads, self._repr_absmax
        scores = block_scores(self._pool_reprs, query, hkv, False, absmax)
        if self._pool_end < self.blocks.num_blocks:
            since = block_scores(self.reprs[self._pool_end :], query, hkv, False, absmax)
            scores = torch.cat((scores, since))
        return scores

    def _vote_prompt_end(self, q: torch.Tensor) -> None:
        """prompt_end_blocks: this layer's votes for the chunk that ends a prompt (`InfLLMMemory.vote_prompt_end`):
        the blocks whose exact logits rise most from the chunk before (`end_baseline`) to this one.

        On long prose the blocks every query rates highly (the document's first ones, common words) outrank, by
        exact logits alone, the passage a question asks for, in most layers; what the question asks for and the
        prose before it did not is the rise. The first stage shortlists rerank_blocks blocks by the rise of their
        summaries' scores (linear in the ranking query: the difference of two queries scores the rise), then each
        head's largest logit over a block's keys and any of the chunk's queries, summed over heads, minus the same
        for the chunk before, orders the shortlist; the best prompt_end_blocks are the layer's votes.

        prompt_end_queries: N: only the chunk's last N queries vote (a message's question ends it), and its earlier
        queries join the chunk before as the baseline. Where the last chunk holds the end of a pasted document and
        then the question, the document's last sentences otherwise vote for the passages they resemble (on prose
        with speakers' names in capitals, other blocks with such names) and outvote the question's.

        prompt_end_skip: S: the chunk's last S queries neither vote nor count in the baseline (the chat template's
        header of the reply, which ends every message whatever it asks); the N voting queries are the ones before.

        prompt_end_shortlist: L: the first stage shortlists L blocks instead of rerank_blocks. At 64K tokens (4,079
        blocks) the summaries' best 512 held a median of 7 of the 16 blocks that the exact rise over every block
        ranks best in a layer, and dropped needles the exact rise ranked second or third in it.

        prompt_end_rise: positive: each head's rise counts where it is positive, so that heads whose baseline reads
        a block more than the question does take nothing from it; max: the best head's rise alone (a probe of
        four-needle questions at 64K tokens: the summed rise left a needle out of the vote in three cases where these
        kept it; over nine such questions the replies scored as under sum (positive) or a needle more (max, which
        loses two 4K multikey cases), so no preset uses them).

        prompt_end_baseline: own: the baseline is the last chunk's queries before the voting ones, without the chunk
        before. Where a fact like the ones asked for lies in the chunk before (a question about four facts, one of
        them the document's last sentences), its queries read the other facts' blocks as strongly as the question
        does, and their rise vanishes: in a probe at 64K tokens, the other three facts' blocks ranked 503-610 by the
        question's rise (medians over the layers) with that chunk in the baseline, and two of them were voted
        without it.

        The votes are appended to `end_votes` best first (ties: the lower id), for the tally's weights.
        """
        cfg, hkv = self.config, self.shape.num_kv_heads
        n = self.blocks.num_blocks
        if not n:
            return
        q, before = self._vote_queries(q)
        if not q.shape[1]:
            return  # a chunk of the reply's header alone: no query of the message votes
        query = ranking_query(q, cfg.block_ranking, hkv)
        if before.shape[1]:
            query = query - ranking_query(before, cfg.block_ranking, hkv)
        size = cfg.prompt_end_shortlist or cfg.rerank_blocks
        listed = select_blocks(block_scores(self.reprs, query, hkv, False, self._repr_absmax), size)
        shortlist = listed.sort().values
        ids = shortlist.tolist()
        def rise_of(keys: torch.Tensor) -> torch.Tensor:
            if cfg.prompt_end_rise == "sum":
                peaks = peak_block_scores(q, keys)
                return peaks - peak_block_scores(before, keys) if before.shape[1] else peaks
            heads = peak_block_scores(q, keys, per_head=True)  # (n, Hq)
            if before.shape[1]:
                heads = heads - peak_block_scores(before, keys, per_head=True)
            return heads.clamp(min=0).sum(dim=1) if cfg.prompt_end_rise == "positive" else heads.amax(dim=1)
        rise = self.blocks.score_blocks(ids, rise_of)
        places = select_blocks(rise, cfg.prompt_end_blocks)  # ascending: a stable sort keeps ties in id order
        best_first = places[torch.sort(rise[places], descending=True, stable=True).indices]
        self.end_votes.append(shortlist[best_first].tolist())

    def _vote_queries(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt end's voting queries and its baseline (`_vote_prompt_end`): the chunk's last S queries dropped
        (prompt_end_skip), and of the rest, with prompt_end_queries: N, the last N vote and the earlier join the
        chunk before (prompt_end_baseline: previous) or are the baseline alone (own)."""
        cfg, before = self.config, self.end_baseline
        if cfg.prompt_end_baseline == "own":
            before = before[:, :0]
        if cfg.prompt_end_skip:
            q = q[:, : -cfg.prompt_end_skip]
        asked = cfg.prompt_end_queries
        if asked is not None and asked < q.shape[1]:
            before = torch.cat((before, q[:, :-asked].float()), dim=1)
            q = q[:, -asked:]
        return q, before

    def _second_stage(self, q: torch.Tensor, scores: torch.Tensor, candidates: torch.Tensor | None, topk: int
                      ) -> torch.Tensor:
        """Two stages: the summaries' scores (of every block, or of `candidates`) shortlist rerank_blocks blocks, and
        the exact logits of the ranking query over their keys choose among them; returns block ids, ascending.

        The summaries' best rerank_keep_blocks stay: they are the head of the shortlist in the same order (score,
        then block id), so they are chosen among its scores rather than every block's again. The exact logits
        choose the rest among the other candidates. The shortlist's ids are needed on the host to load its keys
        (on CUDA, a wait for the device).
        """
        cfg = self.config
        listed = select_blocks(scores, cfg.rerank_blocks)
        shortlist = listed if candidates is None else candidates[listed]
        keep = min(cfg.rerank_keep_blocks, topk)
        first = scores[listed]
        places = select_blocks(first, keep) if keep else listed[:0]
        excluded = torch.zeros(shortlist.shape, dtype=torch.bool, device=shortlist.device)
        excluded[places] = True
        if cfg.shared_candidates and q.shape[1] == 1:
            # shared_candidates: the blocks most layers chose at the step before join the shortlist (the kept ones
            # stay the summaries' best); their first-stage scores order them where disk reads are skipped (-inf
            # where the codes' shortlist left them unscored). In id order, as the shortlist: ties go to lower ids.
            extra = self.shared_picks.candidates(self.num_seen).to(shortlist.device)
            extra = extra[~torch.isin(extra, shortlist)]
            if extra.numel():
                if candidates is None:
                    extra_first = scores[extra]
                else:
                    extra_first = torch.full(extra.shape, -torch.inf, dtype=scores.dtype, device=scores.device)
                    known = torch.isin(candidates, extra)
                    extra_first[torch.searchsorted(extra, candidates[known])] = scores[known]
                shortlist, order = torch.cat((shortlist, extra)).sort()
                first = torch.cat((first, extra_first))[order]
                excluded = torch.cat((excluded, excluded.new_zeros(extra.shape)))[order]
        ids = shortlist.tolist()
        in_ram = None if cfg.rerank_reads_disk else self.blocks.in_ram(ids)
        if in_ram is None or all(in_ram):
            exact, in_ram = self.blocks.score_blocks(ids, lambda keys: exact_block_scores(q, keys)), None
        else:
            # rerank_reads_disk: false: only the candidates in RAM are scored (none is read from disk).
            held = [i for i, yes in enumerate(in_ram) if yes]
            exact = torch.full(shortlist.shape, -torch.inf, device=shortlist.device)
            if held:
                exact[torch.tensor(held, device=shortlist.device)] = self.blocks.score_blocks(
                    [ids[i] for i in held], lambda keys: exact_block_scores(q, keys))
            in_ram = torch.tensor(in_ram, device=shortlist.device)
        others = shortlist[second_stage_choice(exact, excluded, in_ram, first, topk - keep)]
        if self.shared_picks is not None and q.shape[1] == 1:
            if cfg.shared_votes == "exact":
                # The candidates the exact logits rank best, kept ones included (a layer whose summaries already
                # rank a passage among their best finds it there, and its exact logits say so).
                best = select_blocks(exact, topk - keep)
                votes = shortlist[best[exact[best] > -torch.inf]]
            else:
                votes = others
            self.shared_picks.vote(self.num_seen, votes.tolist())
        return torch.cat((shortlist[excluded], others)).sort().values

    def _run_starts(self, chosen: BlockIds | None, num_keys: int) -> torch.Tensor:
        """(H, G) bool over the global keys as `_global_keys` lays them out (sinks, chosen blocks, remainder, then
        the window's keys outside the band): True where a key does not follow the key before it in the text
        (H = Hkv for per-head choices, else 1). The remainder follows the last block and the window follows the
        remainder; block 0 follows the sinks."""
        b, sinks = self.config.block_size, self.sink_k.shape[1]
        ids = torch.empty((1, 0), dtype=torch.long) if chosen is None else chosen.tensor().cpu()
        ids = ids if ids.dim() == 2 else ids[None]
        heads, n = ids.shape
        starts = torch.zeros((heads, num_keys), dtype=torch.bool)
        starts[:, 0] = True
        if n:
            before = torch.cat((torch.full((heads, 1), -1 if sinks else -2), ids[:, :-1]), dim=1)
            starts[:, sinks : sinks + n * b : b] = ids != before + 1
        tail = sinks + n * b
        if tail < num_keys:
            last = self.blocks.num_blocks - 1
            follows = (ids[:, -1] == last) if n else torch.full((heads,), last < 0 and sinks > 0)
            starts[:, tail] = ~follows
        return starts.to(self.device)

    def _place_near(self, glob_k: torch.Tensor, chosen: BlockIds | None, far: int, num_memory: int, first_pos: int
                    ) -> torch.Tensor:
        """sink_memory_distance, voted_memory_distance: with shared positions the query sits at `far` from keys at
        position 0; the sinks (with sink_memory_with_voted, only while voted blocks are near), and the chosen blocks
        the prompt's end voted for (`end_blocks`, or those voted_memory_places or _consensus leave: `end_near`), are
        rotated to far - theirs, which places them at their own distance. Rows of `glob_k` (a fresh buffer: rotated
        in place) as `_global_keys` lays them out: the sinks that have left the window first, and the sinks still in
        it (at `first_pos` on) among the complement keys after the `num_memory` memory keys."""
        cfg, b = self.config, self.config.block_size
        sinks = self.sink_k.shape[1]
        near = self.end_blocks if self.end_near is None else self.end_near  # voted_memory_places, _consensus
        voted_near = cfg.voted_memory_distance is not None and chosen is not None and self.end_blocks is not None \
            and near.numel() > 0
        if cfg.sink_memory_distance is not None and (voted_near or not cfg.sink_memory_with_voted):
            position = far - cfg.sink_memory_distance
            window_sinks = min(max(0, cfg.num_sink_tokens - first_pos), glob_k.shape[1] - num_memory)
            for start, stop in ((0, sinks), (num_memory, num_memory + window_sinks)):
                if stop > start:
                    glob_k[:, start:stop] = self.rotary.rotate_at(glob_k[:, start:stop], position).to(glob_k.dtype)
        if not voted_near:
            return glob_k
        ids = chosen.tensor()  # (n,): the vote needs the second stage, which per-head ranking does not have
        places = torch.nonzero(torch.isin(ids, near.to(ids.device))).flatten()
        if places.numel():
            keys = (sinks + places[:, None] * b + torch.arange(b, device=ids.device)).flatten().to(glob_k.device)
            position = far - cfg.voted_memory_distance
            glob_k[:, keys] = self.rotary.rotate_at(glob_k[:, keys], position).to(glob_k.dtype)
        return glob_k

    def _global_keys(self, chosen: BlockIds | None, comp_k: torch.Tensor, comp_v: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The global stage's unrotated keys and values, (Hkv, M + C, D) each: sinks, the chosen blocks (inf-llm),
        the remainder (inf-llm), then the C complement keys of the chunk-window; and M, the memory keys' count.

        Written once into one buffer per K and V: the chosen blocks go from the block store's slots straight to
        their place (`BlockStore.gather(out=...)`); each copy of ~1K retrieved keys per layer costs on every
        decoded token.
        """
        inf_llm = self.config.method == "inf-llm"
        n_blocks = 0 if chosen is None else chosen.tensor().shape[-1]
        parts = [(self.sink_k, self.sink_v), None] + ([(self.rem_k, self.rem_v)] if inf_llm else []) + [(comp_k, comp_v)]
        sizes = [self.sink_k.shape[1], n_blocks * self.config.block_size] + [k.shape[1] for k, _ in parts[2:]]
        hkv, d = self.shape.num_kv_heads, self.shape.head_dim
        glob_k = torch.empty((hkv, sum(sizes), d), dtype=self.dtype, device=self.device)
        glob_v = torch.empty_like(glob_k)
        start = 0
        for part, size in zip(parts, sizes):
            if part is None:
                if size:
                    self.blocks.gather(chosen, out=(glob_k[:, start : start + size], glob_v[:, start : start + size]))
            elif size:
                glob_k[:, start : start + size] = part[0]
                glob_v[:, start : start + size] = part[1]
            start += size
        return glob_k, glob_v, start - sizes[-1]

    # --- memory update ----------------------------------------------------------------------------------------

    def _evict(self) -> None:
        cfg = self.config
        n_out = self.window_len - cfg.window_for(self.num_seen)  # the window of the chunk just attended
        if n_out <= 0:
            return
        first_pos = self.num_seen - self.window_len
        s, e = self.win_start, self.win_start + n_out
        n_sink = min(max(cfg.num_sink_tokens - first_pos, 0), n_out)
        if n_sink:
            self.sink_k = torch.cat((self.sink_k, self.win_k[:, s : s + n_sink]), dim=1)
            self.sink_v = torch.cat((self.sink_v, self.win_v[:, s : s + n_sink]), dim=1)
        if cfg.method == "inf-llm" and n_out > n_sink:
            self.rem_k = torch.cat((self.rem_k, self.win_k[:, s + n_sink : e]), dim=1)
            self.rem_v = torch.cat((self.rem_v, self.win_v[:, s + n_sink : e]), dim=1)
            self.rem_score = torch.cat((self.rem_score, self.win_score[:, s + n_sink : e]), dim=1)
            self._form_blocks()
        self.win_start = e

    def _form_blocks(self) -> None:
        size = self.config.block_size
        n = self.rem_k.shape[1] // size
        if n == 0:
            return
        hkv, hq, d = self.shape.num_kv_heads, self.shape.num_heads, self.shape.head_dim
        k = self.rem_k[:, : n * size].reshape(hkv, n, size, d).transpose(0, 1)  # (n, Hkv, B, D)
        v = self.rem_v[:, : n * size].reshape(hkv, n, size, d).transpose(0, 1)
        score = self.rem_score[:, : n * size].reshape(hq, n, size).transpose(0, 1)  # (n, Hq, B)
        if self.config.block_ranking == "bounds":
            self._append_reprs(key_bounds(k))
        else:
            self._append_reprs(representatives(k, score, self.config.repr_tokens))
        self.blocks.append(k, v)
        self.rem_k, self.rem_v = self.rem_k[:, n * size :], self.rem_v[:, n * size :]
        self.rem_score = self.rem_score[:, n * size :]
