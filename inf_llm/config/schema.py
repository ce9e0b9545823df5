"""InfLLM settings: the one config schema (`InfLLMConfig`), validated at construction.

The settings are those of the paper's context memory (Xiao et al., 2024, arXiv 2402.04617, section 3):
sinks ("initial tokens"), local window, memory blocks with representative tokens, top-k block retrieval,
and the device cache of offloaded blocks. Facts of the model (heads, RoPE base and scaling) come from the
checkpoint and never from here.

Two YAML formats load (`inf_llm.config.files.load_config`): ours, a flat mapping of `InfLLMConfig` field names
(a preset in `config/` is one: `inf_llm.config.presets`), and the reference's (thunlp/InfLLM `config/*.yaml`,
recognised by its top-level `model:` mapping), which is translated through `REFERENCE_KEYS`
(`inf_llm.config.reference`). Both are strict: an unknown key is an error naming it.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

METHODS = ("inf-llm", "stream-llm", "infinite-lm", "full")
CACHE_POLICIES = ("lru", "lru-s", "fifo")
STORAGE_DTYPES = ("auto", "float16", "bfloat16", "float32", "int8")
REPR_DTYPES = ("float32", "float16")
KERNEL_BACKENDS = ("auto", "torch", "triton")
BLOCK_RANKINGS = ("representatives", "bounds")
MEMORY_POSITIONS = ("shared", "ordered", "runs")
SHARED_VOTES = ("picks", "exact")
PROMPT_END_TALLIES = ("count", "rank")
PROMPT_END_RISES = ("sum", "positive", "max")
PROMPT_END_BASELINES = ("previous", "own")
# Settings added after sessions and benchmark results were recorded, at the value that reproduces what those
# recorded: a saved identity without the key is read as having this value.
ADDED_LATER = {"repr_dtype": "float32", "block_ranking": "representatives", "rank_rotated": False,
               "rank_distance": None, "following_blocks": 0, "memory_positions": "shared", "prefill_topk_blocks": None,
               "rerank_blocks": None, "rerank_chunks": True, "rerank_keep_blocks": 0,
               "decode_rank_every": 1, "rerank_reads_disk": True, "ranking_code_rank": None,
               "ranking_code_blocks": 4096, "shared_blocks": 0,
               "shared_candidates": 0, "shared_decay": 0.0,
               "shared_votes": "picks", "prompt_end_blocks": 0, "reply_pool_blocks": None,
               "reply_pool_every": 8, "prompt_end_queries": None, "prompt_end_following": 0,
               "prompt_end_rounds": 1, "prompt_end_tally": "count", "prompt_end_skip": 0,
               "prompt_end_run": 1, "prompt_end_shortlist": None, "prompt_end_rise": "sum",
               "prompt_end_baseline": "previous", "prompt_end_recent": 0,
               "memory_distance": None,
               "memory_positions_until": None, "decode_memory_distance": None, "reply_start_distance": None,
               "decode_memory_distance_from": None, "decode_memory_distance_steps": None,
               "decode_memory_positions": None, "decode_memory_bias": 0.0, "sink_memory_distance": None,
               "voted_memory_distance": None, "voted_memory_places": None, "voted_memory_consensus": None,
               "sink_memory_with_voted": False, "wide_window": None, "wide_window_until": None,
               "short_conversation": None, "short_conversation_until": None}
# Fields a short_conversation mapping may not set: the method and the regime itself.
NOT_SHORT = ("method", "short_conversation", "short_conversation_until")


class ConfigError(ValueError):
    """A config file could not be read or is invalid; the message names the file and the offending key."""


# The most tokens or blocks a count may name: larger values (10**30 in a YAML file) do not fit the tensors they size.
MAX_COUNT = 2**31 - 1


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = MAX_COUNT) -> None:
    # bool is an int subclass in Python; `topk_blocks: true` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: must be an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value!r} is invalid: must be at most {maximum}")


def _check_until(name: str, value: Any, until_name: str, until: Any, meaning: str) -> bool:
    """A setting that holds within a conversation's first `until` tokens: both set (True, `until` checked) or
    neither (False)."""
    if value is None:
        if until is not None:
            raise ValueError(f"{until_name}={until} has no effect without {name}: set {name}, or {until_name}: null")
        return False
    if until is None:
        raise ValueError(f"{name}={value!r} needs {until_name}, {meaning}: set {until_name}, or {name}: null")
    _check_int(until_name, until, 1)
    return True


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is invalid: must be one of {', '.join(map(repr, choices))}")


@dataclass(frozen=True)
class InfLLMConfig:
    """Every InfLLM setting. A preset in `config/` is a serialised instance.

    Our name             reference (under `model:`)       meaning
    method               type ("origin" is full)          inf-llm | stream-llm | infinite-lm | full
    num_sink_tokens      n_init                           first tokens of the stream, attended forever
    local_window         n_local                          most recent tokens, attended with exact RoPE
    wide_window          (none)                           a larger window, >= local_window, for the chunks that
                                                          end within the conversation's first
                                                          wide_window_until tokens; local_window for every chunk
                                                          after (null: local_window always). A window that
                                                          narrows moves its oldest keys to memory at once
    wide_window_until    (none)                           with wide_window: that many tokens (>= 1)
    short_conversation   (none)                           settings (a mapping of these fields) that replace
                                                          this config's while the conversation, at the end of
                                                          each prompt, is within short_conversation_until
                                                          tokens; once a prompt ends past it, the conversation
                                                          so far is read again under this config's own
                                                          settings, exactly as if they had held throughout
                                                          (null: these settings always)
    short_conversation_until (none)                       with short_conversation: that many tokens (>= 1)
    block_size           block_size                       tokens per memory block
    repr_tokens          repr_topk                        representative tokens per block (retrieval keys)
    topk_blocks          topk                             memory blocks retrieved per chunk of queries
    prefill_topk_blocks  (none)                           blocks retrieved per chunk of more than one query (a
                                                          prompt being read); null = topk_blocks. Decoding
                                                          steps (one query) retrieve topk_blocks
    chunk_size           exc_block_size                   queries processed per attention chunk in prefill
    device_cache_blocks  max_cached_block                 memory blocks cached on the compute device
    cache_policy         cache_strategy                   device-cache eviction: lru | lru-s | fifo
    score_decay          score_decay                      lru-s only: decay of the block score, in (0, 1)
    per_head_ranking     perhead                          rank blocks per head instead of per layer
    block_ranking        (none)                           what a block is ranked by: representatives (the
                                                          paper: the mean of its repr_tokens most attended
                                                          keys) | bounds (per-channel max and min of its keys:
                                                          an upper bound of every key's logit, as Quest)
    rank_rotated         (none)                           rank with the query rotated as the global stage
                                                          attends (distance local_window; the reference's
                                                          choice) instead of unrotated (distance 0)
    rank_distance        (none)                           with rank_rotated: the distance the query is rotated
                                                          to for choosing blocks (both stages, the prompt end's
                                                          vote), >= 0, whatever distance the global stage then
                                                          attends them at (null: the global stage's)
    rerank_blocks        (none)                           two-stage retrieval: the summaries shortlist this
                                                          many blocks, and the exact logits of the ranking
                                                          query over their keys choose the top-k among them
                                                          (each head's largest logit in a block, summed over
                                                          heads); null = the summaries choose alone
    rerank_chunks        (none)                           with rerank_blocks: also re-rank for chunks of more
                                                          than one query (a prompt being read), whose ranking
                                                          query is their mean; false = decoding steps only
    rerank_keep_blocks   (none)                           with rerank_blocks: this many of the top-k are the
                                                          summaries' best, kept; the exact logits choose the
                                                          rest from the other candidates (0 = all of them)
    rerank_reads_disk    (none)                           with rerank_blocks: true = every candidate's keys are
                                                          read, from disk if need be; false = only candidates
                                                          whose keys are in RAM (device cache or host tier) are
                                                          scored exactly, and those only on disk follow them
                                                          in the summaries' order. Identical while every block
                                                          fits in host_cache_bytes; beyond it, a step's disk
                                                          reads are the chosen blocks' only
    shared_blocks        (none)                           with rerank_blocks: each decoding step also attends,
                                                          in every layer, the N blocks that the most layers'
                                                          second stages chose at the previous ranked step (a
                                                          passage some layers find, all layers read); 0 = none
    shared_candidates    (none)                           with rerank_blocks: each decoding step adds to every
                                                          layer's shortlist the N blocks that the most layers'
                                                          second stages chose at the previous ranked step; the
                                                          layer's exact logits decide if they are chosen (the
                                                          device cache holds rerank_blocks + N); 0 = none
    shared_decay         (none)                           with shared_blocks or shared_candidates: the choices of
                                                          earlier decoding steps count too, each step's weighed
                                                          by this factor per step since (0 = the step before
                                                          only; 1 = every step since the prompt, equally)
    shared_votes         picks, exact                     what each layer counts for sharing: picks = the blocks
                                                          its exact logits added to the kept ones; exact = its
                                                          best (topk_blocks - rerank_keep_blocks) candidates by
                                                          exact logits, kept ones included
    prompt_end_blocks    (none)                           with rerank_blocks: the chunk that ends a prompt is
                                                          read twice. First each layer votes for the N blocks
                                                          whose exact logits rise most from the chunk before
                                                          to it (the largest logit of any of its queries, per
                                                          head, minus that of the chunk before's; among the
                                                          rerank_blocks whose first-stage scores rise most);
                                                          then every layer attends the N most voted, in that
                                                          chunk and at every step of the reply; 0 = off
    prompt_end_queries   (none)                           with prompt_end_blocks: the vote's queries are the
                                                          prompt's last N (where a question ends a message);
                                                          the chunk's earlier ones join the chunk before as
                                                          what the rise is measured from; null = the whole
                                                          chunk votes, against the chunk before
    prompt_end_following (none)                           with prompt_end_blocks: each voted block comes with
                                                          the N blocks after it (a question's words match a
                                                          fact's key, and its value may be cut into the next
                                                          block); 0 = the voted blocks only
    prompt_end_rounds    (none)                           with prompt_end_blocks: the chunk is read for votes
                                                          this many times, each round attending the blocks the
                                                          rounds before chose and adding the N most voted that
                                                          they did not (a question whose answer needs a second
                                                          fact, which the first fact's passage points to); 1 =
                                                          one round
    prompt_end_tally     count, rank                      with prompt_end_blocks: how the layers' votes add
                                                          up: count = one each (a block voted by many layers
                                                          wins); rank = a layer's i-th best vote counts 1/i (a
                                                          passage a few layers put first outweighs blocks many
                                                          layers give their last votes to)
    prompt_end_skip      (none)                           with prompt_end_queries: the prompt's last N queries
                                                          neither vote nor count in the baseline (the chat
                                                          template's header of the reply, which ends every
                                                          message); the voting queries are the ones before
                                                          them; 0 = none skipped
    prompt_end_run       (none)                           with prompt_end_blocks: the places are filled by runs
                                                          of up to N adjacent blocks: each voted block, in the
                                                          tally's order, with the neighbours on the side that
                                                          has more votes (a fact's sentence cut by a block
                                                          boundary comes back whole); 1 = the voted blocks
    prompt_end_shortlist (none)                           with prompt_end_blocks: the vote's exact logits are
                                                          computed for this many blocks, those whose
                                                          first-stage scores rise most (a device cache's worth
                                                          at a time); at least the memory's block count scores
                                                          every block; null = rerank_blocks
    prompt_end_rise      sum, positive, max               with prompt_end_blocks: how a block's rise adds up
                                                          over the query heads: sum = the heads' summed peak
                                                          logits, this chunk's less the chunk before's;
                                                          positive = each head's own rise, counted where it is
                                                          positive (a head whose baseline reads the block more
                                                          takes nothing away); max = the best head's rise
    prompt_end_baseline  previous, own                    with prompt_end_blocks: what the voting queries' rise
                                                          is measured from: previous = the chunk before and the
                                                          last chunk's earlier queries; own = the last chunk's
                                                          earlier queries alone (a fact in the chunk before then
                                                          does not lower the blocks like it)
    prompt_end_recent    (none)                           with prompt_end_blocks: the first N blocks formed after
                                                          the vote (the prose just before the question, then the
                                                          question) join the voted blocks once they form: a fact
                                                          there was not yet a block when the question voted
    ranking_code_rank    (none)                           an approximate first stage: each block's summary is
                                                          also kept as a code of this many numbers (its
                                                          coordinates along the principal directions of the
                                                          first ranking_code_blocks summaries), and once a
                                                          layer holds more blocks than that, the codes'
                                                          estimate shortlists ranking_code_blocks blocks whose
                                                          summaries are then scored exactly; null = every
                                                          summary is scored (exact)
    ranking_code_blocks  (none)                           with ranking_code_rank: the blocks the directions are
                                                          computed from, and the codes' shortlist
    reply_pool_blocks    (none)                           a bounded first stage while decoding: a step that
                                                          ranks every block keeps the best N by its first-stage
                                                          scores as the reply's pool, and the next
                                                          reply_pool_every - 1 ranked steps score only the pool
                                                          and the blocks formed since (a prompt's chunks rank
                                                          every block and end the pool); used once a layer
                                                          holds more than N blocks; null = every step scores
                                                          every block (exact)
    reply_pool_every     (none)                           with reply_pool_blocks: the ranked decoding steps one
                                                          pool serves, the one that forms it included
    decode_rank_every    (none)                           decoding ranks (both stages) at the first step after
                                                          a prompt and every N-th step after it; the steps
                                                          between attend the blocks that ranking chose, as the
                                                          queries of one prompt chunk share a choice (1 = every
                                                          step ranks, the paper)
    following_blocks     (none)                           also retrieve the next N blocks after each chosen
                                                          one (a passage cut by a block boundary)
    memory_positions     (none)                           where the global stage places what it attends: shared
                                                          (the paper: every memory token at distance
                                                          local_window) | ordered (in their text order, next to
                                                          each other, the last at distance local_window: the
                                                          retrieved passages read as one text with the gaps cut)
                                                          | runs (each run of text-adjacent keys in its order, the
                                                          last key of every run at distance local_window)
    memory_distance      (none)                           that distance itself, >= 1 (null: local_window, the
                                                          paper's): farther, what memory brings back weighs less
                                                          against the local window (measured in BENCHMARKS.md:
                                                          fewer empty replies, fewer answers); nearer than the
                                                          window, a large window keeps memory as near as a small
                                                          one would
    memory_positions_until (none)                         with ordered or runs: those positions for the chunks
                                                          that end within the conversation's first N tokens, shared
                                                          for every chunk after (null: always)
    decode_memory_positions (none)                        where decoding steps (one query) place memory: shared |
                                                          ordered | runs, as memory_positions (null: as
                                                          memory_positions, and memory_positions_until); prompts
                                                          are read by memory_positions
    decode_memory_distance (none)                         the global distance of decoding steps (one query) only,
                                                          >= local_window (null: memory_distance's); prompts are
                                                          read at memory_distance
    decode_memory_distance_from (none)                    with decode_memory_distance: only the replies to a
                                                          prompt of at least N tokens (a pasted document) decode
                                                          at it; a reply to a shorter prompt (a question about
                                                          what memory holds) decodes at memory_distance's (the
                                                          window's); >= 1 (null: every reply)
    decode_memory_distance_steps (none)                   with decode_memory_distance: only a reply's first N
                                                          decoding steps (the step that reads the prompt's last
                                                          token is the first) decode at it, the later ones as
                                                          without it; >= 1 (null: every step)
    reply_start_distance (none)                           the global distance of the first decoding step after a
                                                          prompt (a one-query chunk after a chunk of several: the
                                                          step that reads a prompt's last token and gives the
                                                          reply's first), >= local_window (null: as the other steps)
    sink_memory_distance (none)                           with shared positions: the sinks (the conversation's
                                                          first tokens) at this distance, the rest of memory at
                                                          the chunk's global distance; >= 1 and at most every
                                                          global distance in use (null: with the rest)
    voted_memory_distance (none)                          with prompt_end_blocks and shared positions: the blocks
                                                          the prompt's end voted for at this distance while they
                                                          are attended (the prompt's last chunk and the reply),
                                                          the rest of memory at the global distance; bounds as
                                                          sink_memory_distance (null: with the rest)
    voted_memory_places  (none)                           with voted_memory_distance: only the first N places the
                                                          vote filled (the most voted first, with its run,
                                                          prompt_end_run) at that distance, the other voted
                                                          blocks at the global distance (null: every voted block)
    voted_memory_consensus (none)                         with voted_memory_distance: only the runs the vote
                                                          filled whose blocks' tally adds up to at least this
                                                          many times the tally of a block that every layer ranks
                                                          first (> 0, <= prompt_end_run) at that distance (null:
                                                          every run)
    sink_memory_with_voted (false)                        with sink_memory_distance and voted_memory_distance: the
                                                          sinks at their distance only while voted blocks are
                                                          (the rest of the time with the rest of memory)
    decode_memory_bias   (none)                           a number >= 0 subtracted from the logit of every key the
                                                          global stage attends at decoding steps (one query): what
                                                          memory brings back weighs exp(-bias) as much against the
                                                          local window, its keys' weights among themselves
                                                          unchanged (0: none, the paper's)
    storage_dtype        (none)                           host dtype of blocks; auto = model's if 16-bit;
                                                          int8 = 8-bit with a scale per block and KV head
    repr_dtype           (none)                           dtype of the representatives and of block scoring:
                                                          float16 (default: half the RAM and the bytes read
                                                          per token; scores rounded to 16 bits) | float32
    kernel_backend       (fattn, see REFERENCE_KEYS)      auto | torch | triton; outputs do not depend on it
    host_cache_bytes     (none)                           RAM for block K/V, all layers together (split evenly);
                                                          null = unbounded; blocks beyond it go to disk
    disk_dir             (none)                           folder in which the blocks beyond host_cache_bytes
                                                          get a temporary subfolder; null = the system's temp

    Invariants refused at construction: `topk_blocks <= device_cache_blocks` (the reference crashes
    otherwise), `repr_tokens <= block_size` and, for every windowed method, `chunk_size <= local_window`.
    The memory fields do not matter to `full` and are only checked one by one for it.
    """

    method: str = "inf-llm"
    num_sink_tokens: int = 32
    local_window: int = 128
    wide_window: int | None = None
    wide_window_until: int | None = None
    short_conversation: dict[str, Any] | None = None
    short_conversation_until: int | None = None
    block_size: int = 16
    repr_tokens: int = 4
    topk_blocks: int = 64
    prefill_topk_blocks: int | None = None
    chunk_size: int = 128
    device_cache_blocks: int = 128
    cache_policy: str = "lru"
    score_decay: float | None = None
    per_head_ranking: bool = False
    block_ranking: str = "bounds"
    rank_rotated: bool = True
    rank_distance: int | None = None
    rerank_blocks: int | None = None
    rerank_chunks: bool = True
    rerank_keep_blocks: int = 0
    rerank_reads_disk: bool = True
    shared_blocks: int = 0
    shared_candidates: int = 0
    shared_decay: float = 0.0
    shared_votes: str = "picks"
    prompt_end_blocks: int = 0
    prompt_end_queries: int | None = None
    prompt_end_following: int = 0
    prompt_end_rounds: int = 1
    prompt_end_tally: str = "count"
    prompt_end_skip: int = 0
    prompt_end_run: int = 1
    prompt_end_shortlist: int | None = None
    prompt_end_rise: str = "sum"
    prompt_end_baseline: str = "previous"
    prompt_end_recent: int = 0
    ranking_code_rank: int | None = None
    ranking_code_blocks: int = 4096
    reply_pool_blocks: int | None = None
    reply_pool_every: int = 8
    decode_rank_every: int = 1
    following_blocks: int = 0
    memory_positions: str = "shared"
    memory_distance: int | None = None
    memory_positions_until: int | None = None
    decode_memory_distance: int | None = None
    decode_memory_distance_from: int | None = None
    decode_memory_distance_steps: int | None = None
    reply_start_distance: int | None = None
    decode_memory_positions: str | None = None
    decode_memory_bias: float = 0.0
    sink_memory_distance: int | None = None
    voted_memory_distance: int | None = None
    voted_memory_places: int | None = None
    voted_memory_consensus: float | None = None
    sink_memory_with_voted: bool = False
    storage_dtype: str = "auto"
    repr_dtype: str = "float16"
    kernel_backend: str = "auto"
    host_cache_bytes: int | None = None
    disk_dir: str | None = None

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_int("num_sink_tokens", self.num_sink_tokens, 0)
        _check_int("following_blocks", self.following_blocks, 0)
        _check_int("shared_blocks", self.shared_blocks, 0)
        _check_int("shared_candidates", self.shared_candidates, 0)
        _check_int("prompt_end_blocks", self.prompt_end_blocks, 0)
        _check_int("prompt_end_following", self.prompt_end_following, 0)
        _check_int("prompt_end_recent", self.prompt_end_recent, 0)
        _check_int("prompt_end_skip", self.prompt_end_skip, 0)
        for name in ("local_window", "block_size", "repr_tokens", "chunk_size", "device_cache_blocks", "decode_rank_every",
                     "reply_pool_every", "prompt_end_rounds", "prompt_end_run"):
            _check_int(name, getattr(self, name), 1)
        self._check_wide_window()
        self._check_short_conversation()
        if self.memory_distance is not None:  # below local_window too: positions only (docs/METHOD.md)
            _check_int("memory_distance", self.memory_distance, 1)
        if self.rank_distance is not None:
            _check_int("rank_distance", self.rank_distance, 0)
            if self.rank_rotated is False:
                raise ValueError(f"rank_distance={self.rank_distance} rotates the query that chooses blocks, but "
                                 "rank_rotated is false (unrotated): set rank_rotated: true, or rank_distance: null")
        if self.decode_memory_distance is not None:
            _check_int("decode_memory_distance", self.decode_memory_distance, self.local_window)
        # Settings that choose which decoding steps are far: without the distance they have nothing to choose.
        for name, chooses in (("decode_memory_distance_from", "chooses the replies decoded"),
                              ("decode_memory_distance_steps", "counts a reply's steps decoded")):
            value = getattr(self, name)
            if value is None:
                continue
            _check_int(name, value, 1)
            if self.decode_memory_distance is None:
                raise ValueError(f"{name}={value} {chooses} at decode_memory_distance, which is not set: set "
                                 f"decode_memory_distance, or {name}: null")
        if self.reply_start_distance is not None:
            _check_int("reply_start_distance", self.reply_start_distance, self.local_window)
        # The baselines retrieve nothing, so zero blocks is meaningful for them only.
        _check_int("topk_blocks", self.topk_blocks, 1 if self.method == "inf-llm" else 0)
        if self.prefill_topk_blocks is not None:
            _check_int("prefill_topk_blocks", self.prefill_topk_blocks, 1)
        _check_choice("cache_policy", self.cache_policy, CACHE_POLICIES)
        _check_choice("storage_dtype", self.storage_dtype, STORAGE_DTYPES)
        _check_choice("repr_dtype", self.repr_dtype, REPR_DTYPES)
        _check_choice("kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
        _check_choice("block_ranking", self.block_ranking, BLOCK_RANKINGS)
        _check_choice("memory_positions", self.memory_positions, MEMORY_POSITIONS)
        if self.memory_positions_until is not None:
            _check_int("memory_positions_until", self.memory_positions_until, 1)
            if self.memory_positions == "shared":
                raise ValueError(f"memory_positions_until={self.memory_positions_until} has no effect with "
                                 "memory_positions: shared: set memory_positions: ordered (or runs), or "
                                 "memory_positions_until: null")
        if self.decode_memory_positions is not None:
            _check_choice("decode_memory_positions", self.decode_memory_positions, MEMORY_POSITIONS)
        bias = self.decode_memory_bias
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not 0 <= bias < float("inf"):
            raise ValueError(f"decode_memory_bias={bias!r} is invalid: must be a number >= 0 (0: no bias)")
        _check_choice("shared_votes", self.shared_votes, SHARED_VOTES)
        _check_choice("prompt_end_tally", self.prompt_end_tally, PROMPT_END_TALLIES)
        _check_choice("prompt_end_rise", self.prompt_end_rise, PROMPT_END_RISES)
        _check_choice("prompt_end_baseline", self.prompt_end_baseline, PROMPT_END_BASELINES)
        for name in ("per_head_ranking", "rank_rotated", "rerank_chunks", "rerank_reads_disk",
                     "sink_memory_with_voted"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be true or false")
        self._check_score_decay()
        self._check_shared_decay()
        self._check_tiers()
        if self.method != "full" and self.chunk_size > self.local_window:
            raise ValueError(
                f"chunk_size={self.chunk_size} exceeds local_window={self.local_window}: every query of a chunk "
                "must find its local keys in the window; use chunk_size <= local_window")
        retrieved = self.retrieved_blocks
        if self.method == "inf-llm" and retrieved > self.device_cache_blocks:
            most = ("topk_blocks", self.topk_blocks) if self.topk_blocks >= self.chunk_topk_blocks else \
                ("prefill_topk_blocks", self.prefill_topk_blocks)
            unset = {"shared_blocks": 0, "prompt_end_blocks": 0, "prompt_end_following": 0, "prompt_end_rounds": 1,
                     "prompt_end_recent": 0, "following_blocks": 0}  # the values that add no block: not named
            extras = [f"{name}={getattr(self, name)}" for name, value in unset.items() if getattr(self, name) != value]
            what = f"{most[0]}={most[1]}" + (f" with {' and '.join(extras)} ({retrieved} blocks)" if extras else "")
            raise ValueError(
                f"{what} exceeds device_cache_blocks={self.device_cache_blocks}: the "
                "retrieved blocks must all fit in the device cache; raise device_cache_blocks or lower topk_blocks")
        self._check_rerank()
        self._check_codes()
        self._check_reply_pool()
        self._check_prompt_end()
        self._check_near_distances()
        if self.per_head_ranking and self.following_blocks:
            raise ValueError(f"following_blocks={self.following_blocks} is not supported with per_head_ranking: "
                             "set following_blocks: 0 or per_head_ranking: false")
        if self.method == "inf-llm" and self.repr_tokens > self.block_size:
            raise ValueError(
                f"repr_tokens={self.repr_tokens} exceeds block_size={self.block_size}: a block's representatives "
                "are chosen among its own tokens; use repr_tokens <= block_size")

    def __hash__(self) -> int:
        # The generated hash would fail on short_conversation's mapping; equal configs hash alike.
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v
                          for v in (getattr(self, name) for name in FIELD_NAMES)))

    @property
    def shares_picks(self) -> bool:
        """Whether the layers share their second stages' choices (shared_blocks or shared_candidates)."""
        return bool(self.shared_blocks or self.shared_candidates)

    @property
    def chunk_topk_blocks(self) -> int:
        """The top-k of a chunk of more than one query (a prompt being read)."""
        return self.topk_blocks if self.prefill_topk_blocks is None else self.prefill_topk_blocks

    @property
    def global_distance(self) -> int:
        """The distance at which the global stage places memory (the last of it, for ordered or runs positions)
        for a chunk whose window is local_window."""
        return self.local_window if self.memory_distance is None else self.memory_distance

    @property
    def widest_window(self) -> int:
        """The largest window any chunk has (wide_window when set)."""
        return max(self.local_window, self.wide_window or 0)

    def window_for(self, end: int) -> int:
        """The local window of a chunk that ends after the conversation's first `end` tokens: wide_window while
        `end` is within wide_window_until, local_window otherwise."""
        if self.wide_window is not None and end <= self.wide_window_until:
            return self.wide_window
        return self.local_window

    def distance_for(self, queries: int, reply_start: bool = False, window: int | None = None,
                     prompt_tokens: int = 0, reply_step: int = 0) -> int:
        """The global distance of a chunk of this many queries whose window is `window` (null: local_window): for
        a decoding step (one query), reply_start_distance when it is the first after a prompt (`reply_start`) and
        that is set, else decode_memory_distance when set (and the prompt replied to, `prompt_tokens` long as the
        engine read it, is at least decode_memory_distance_from long, and the step, the reply's `reply_step`-th
        from 0, is among its first decode_memory_distance_steps); memory_distance when set; the window
        otherwise."""
        if queries == 1 and reply_start and self.reply_start_distance is not None:
            return self.reply_start_distance
        if queries == 1 and self.decode_memory_distance is not None and (
                self.decode_memory_distance_from is None or prompt_tokens >= self.decode_memory_distance_from) and (
                self.decode_memory_distance_steps is None or reply_step < self.decode_memory_distance_steps):
            return self.decode_memory_distance
        if self.memory_distance is None and window is not None:
            return window
        return self.global_distance

    def bias_for(self, queries: int) -> float:
        """What the global stage's logits lose for a chunk of this many queries: decode_memory_bias for a decoding
        step (one query), 0 for a prompt's chunk."""
        return float(self.decode_memory_bias) if queries == 1 and self.method == "inf-llm" else 0.0

    def positions_for(self, queries: int, end: int) -> str:
        """The rule placing memory for a chunk of this many queries that ends after the conversation's first `end`
        tokens: decode_memory_positions for a decoding step (one query) when set, else memory_positions, or shared
        for a chunk that ends beyond memory_positions_until."""
        if queries == 1 and self.decode_memory_positions is not None:
            return self.decode_memory_positions
        until = self.memory_positions_until
        return self.memory_positions if until is None or end <= until else "shared"

    @property
    def orders_memory(self) -> bool:
        """Whether some chunk places memory by the ordered or runs rule (the rotation tables then cover the global
        keys' positions)."""
        return self.method == "inf-llm" and bool({self.memory_positions, self.decode_memory_positions} & {"ordered", "runs"})

    @property
    def farthest_distance(self) -> int:
        """The largest distance the global stage places memory at, or the ranking rotates the query to (for the
        size of the rotation tables)."""
        window = self.widest_window if self.memory_distance is None else 0  # memory at the wide window's distance
        return max(self.global_distance, window, self.decode_memory_distance or 0, self.reply_start_distance or 0,
                   self.rank_distance or 0)

    @property
    def retrieved_blocks(self) -> int:
        """The most blocks one chunk retrieves: the larger top-k, with the shared and the prompt end's blocks (and
        the blocks after these, prompt_end_following, in each of prompt_end_rounds, and the recent ones,
        prompt_end_recent), and with following_blocks, the blocks after each."""
        most = (max(self.topk_blocks + self.shared_blocks, self.chunk_topk_blocks)
                + self.prompt_end_blocks * self.prompt_end_rounds * (1 + self.prompt_end_following)
                + self.prompt_end_recent)
        return most * (1 + self.following_blocks)

    def _check_rerank(self) -> None:
        n = self.rerank_blocks
        _check_int("rerank_keep_blocks", self.rerank_keep_blocks, 0)
        if n is None:
            if not self.rerank_chunks:
                raise ValueError("rerank_chunks=false limits the second stage to decoding steps, but there is none: "
                                 "set rerank_blocks, or rerank_chunks: true")
            if self.rerank_keep_blocks:
                raise ValueError(f"rerank_keep_blocks={self.rerank_keep_blocks} keeps blocks from a second stage, "
                                 "but there is none: set rerank_blocks, or rerank_keep_blocks: 0")
            if not self.rerank_reads_disk:
                raise ValueError("rerank_reads_disk=false limits the second stage's reads, but there is none: "
                                 "set rerank_blocks, or rerank_reads_disk: true")
            if self.shared_blocks:
                raise ValueError(f"shared_blocks={self.shared_blocks} shares the second stage's choices, but there "
                                 "is none: set rerank_blocks, or shared_blocks: 0")
            if self.shared_candidates:
                raise ValueError(f"shared_candidates={self.shared_candidates} shares the second stage's choices, but "
                                 "there is none: set rerank_blocks, or shared_candidates: 0")
            if self.shared_decay:
                raise ValueError(f"shared_decay={self.shared_decay} weighs the second stage's shared choices, but "
                                 "there is none: set rerank_blocks, or shared_decay: 0")
            if self.prompt_end_blocks:
                raise ValueError(f"prompt_end_blocks={self.prompt_end_blocks} votes among the second stage's "
                                 "shortlist, but there is none: set rerank_blocks, or prompt_end_blocks: 0")
            return
        if self.rerank_keep_blocks > self.topk_blocks:
            raise ValueError(f"rerank_keep_blocks={self.rerank_keep_blocks} exceeds topk_blocks={self.topk_blocks}: "
                             "it is the part of the top-k that the summaries choose")
        most = max(self.topk_blocks, self.chunk_topk_blocks)
        _check_int("rerank_blocks", n, 1)
        if n < most:
            raise ValueError(f"rerank_blocks={n} is below the {most} blocks a chunk retrieves: the shortlist must "
                             "hold at least the top-k; raise rerank_blocks or set it to null")
        if self.method == "inf-llm" and n + self.shared_candidates > self.device_cache_blocks:
            what = f"rerank_blocks={n}" + (f" with shared_candidates={self.shared_candidates} "
                                           f"({n + self.shared_candidates} blocks)" if self.shared_candidates else "")
            raise ValueError(f"{what} exceeds device_cache_blocks={self.device_cache_blocks}: the "
                             "shortlist's keys are read from the device cache; raise device_cache_blocks")
        if self.per_head_ranking:
            raise ValueError(f"rerank_blocks={n} is not supported with per_head_ranking: set rerank_blocks: null "
                             "or per_head_ranking: false")

    def _check_codes(self) -> None:
        _check_int("ranking_code_blocks", self.ranking_code_blocks, 1)
        rank = self.ranking_code_rank
        if rank is None:
            return
        _check_int("ranking_code_rank", rank, 1)
        most = max(self.topk_blocks, self.chunk_topk_blocks, self.rerank_blocks or 0)
        if self.ranking_code_blocks < most:
            raise ValueError(f"ranking_code_blocks={self.ranking_code_blocks} is below the {most} blocks the summaries "
                             "choose: the codes' shortlist must hold them; raise ranking_code_blocks")
        if self.per_head_ranking:
            raise ValueError(f"ranking_code_rank={rank} is not supported with per_head_ranking: set "
                             "ranking_code_rank: null or per_head_ranking: false")

    def _check_wide_window(self) -> None:
        if _check_until("wide_window", self.wide_window, "wide_window_until", self.wide_window_until,
                        "the tokens within which chunks have it"):
            _check_int("wide_window", self.wide_window, self.local_window)

    def _check_short_conversation(self) -> None:
        short = self.short_conversation
        if not _check_until("short_conversation", short, "short_conversation_until", self.short_conversation_until,
                            "the tokens within which a conversation has its settings"):
            return
        if not isinstance(short, dict) or not short:
            raise ValueError(f"short_conversation={short!r} is invalid: must be a mapping of settings (e.g. "
                             "{local_window: 512}) or null")
        for key in short:
            if key in NOT_SHORT:
                raise ValueError(f"short_conversation may not set {key!r}: it sets the other settings of a short "
                                 "conversation")
            if key not in FIELD_NAMES:
                raise ValueError(f"short_conversation: {key!r} is not a setting{suggest(key, FIELD_NAMES)}")
        try:
            self.short_config()
        except ValueError as error:
            raise ValueError(f"short_conversation: {error}") from None

    def short_config(self) -> InfLLMConfig | None:
        """The settings of a short conversation (short_conversation applied, the regime itself cleared); None
        without short_conversation."""
        if self.short_conversation is None:
            return None
        return dataclasses.replace(self, **self.short_conversation, short_conversation=None,
                                   short_conversation_until=None)

    def long_config(self) -> InfLLMConfig:
        """The settings once a conversation is long: this config without its short_conversation."""
        if self.short_conversation is None:
            return self
        return dataclasses.replace(self, short_conversation=None, short_conversation_until=None)

    def _check_reply_pool(self) -> None:
        pool = self.reply_pool_blocks
        if pool is None:
            return
        _check_int("reply_pool_blocks", pool, 1)
        most = max(self.topk_blocks, self.rerank_blocks or 0)
        if pool < most:
            raise ValueError(f"reply_pool_blocks={pool} is below the {most} blocks a decoding step's summaries choose: "
                             "the pool must hold them; raise reply_pool_blocks")
        if self.per_head_ranking:
            raise ValueError(f"reply_pool_blocks={pool} is not supported with per_head_ranking: set "
                             "reply_pool_blocks: null or per_head_ranking: false")

    def _check_near_distances(self) -> None:
        """sink_memory_distance, voted_memory_distance: parts of memory placed nearer than the rest. The keys are
        rotated to the global distance less theirs, so theirs may not exceed any global distance in use."""
        distances = [self.global_distance] + [d for d in (self.decode_memory_distance, self.reply_start_distance)
                                              if d is not None]
        for name in ("sink_memory_distance", "voted_memory_distance"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_int(name, value, 1)
            if value > min(distances):
                raise ValueError(f"{name}={value} exceeds the global distance {min(distances)} (local_window, or "
                                 "memory_distance, decode_memory_distance, reply_start_distance when set): it places "
                                 "part of memory nearer than the rest; lower it, or set it to null")
            placed = {self.memory_positions, self.decode_memory_positions or self.memory_positions}
            if placed != {"shared"}:
                raise ValueError(f"{name}={value} needs shared memory positions (ordered and runs place every key "
                                 "by its own rule): set memory_positions: shared and decode_memory_positions: null, "
                                 f"or {name}: null")
        if self.sink_memory_distance is not None and self.method == "stream-llm":
            raise ValueError(f"sink_memory_distance={self.sink_memory_distance} places the sinks in memory, but "
                             "stream-llm keeps them at their true positions: set sink_memory_distance: null")
        places = self.voted_memory_places
        if places is not None:
            _check_int("voted_memory_places", places, 1)
            if self.voted_memory_distance is None:
                raise ValueError(f"voted_memory_places={places} chooses which voted blocks voted_memory_distance "
                                 "places, but it is not set: set voted_memory_distance, or voted_memory_places: null")
            if places > self.prompt_end_blocks:
                raise ValueError(f"voted_memory_places={places} exceeds prompt_end_blocks={self.prompt_end_blocks}, "
                                 "the places the vote fills: lower it, or set it to null (every voted block)")
        consensus = self.voted_memory_consensus
        if consensus is not None:
            most = self.prompt_end_run  # a run of R blocks every layer votes for, by count
            if isinstance(consensus, bool) or not isinstance(consensus, (int, float)) or not 0 < consensus <= most:
                raise ValueError(f"voted_memory_consensus={consensus!r} is invalid: must be a number above 0 and at "
                                 f"most prompt_end_run={most} (a run's tally, in tallies of a block every layer "
                                 "ranks first)")
            object.__setattr__(self, "voted_memory_consensus", float(consensus))  # (YAML may give an int: 1)
            if self.voted_memory_distance is None:
                raise ValueError(f"voted_memory_consensus={consensus} chooses which voted runs "
                                 "voted_memory_distance places, but it is not set: set voted_memory_distance, or "
                                 "voted_memory_consensus: null")
        if self.sink_memory_with_voted and (self.sink_memory_distance is None or self.voted_memory_distance is None):
            raise ValueError("sink_memory_with_voted=true places the sinks at sink_memory_distance while voted "
                             "blocks are at voted_memory_distance, but both must be set: set them, or "
                             "sink_memory_with_voted: false")
        if self.voted_memory_distance is not None and not self.prompt_end_blocks:
            raise ValueError(f"voted_memory_distance={self.voted_memory_distance} places the prompt end's voted blocks, "
                             "but there is no vote: set prompt_end_blocks, or voted_memory_distance: null")

    def _check_prompt_end(self) -> None:
        if self.prompt_end_rounds > 1 and not self.prompt_end_blocks:
            raise ValueError(f"prompt_end_rounds={self.prompt_end_rounds} repeats the prompt end's vote, but there is "
                             "no vote: set prompt_end_blocks, or prompt_end_rounds: 1")
        if self.prompt_end_following and not self.prompt_end_blocks:
            raise ValueError(f"prompt_end_following={self.prompt_end_following} adds blocks after the prompt end's "
                             "voted ones, but there is no vote: set prompt_end_blocks, or prompt_end_following: 0")
        run = self.prompt_end_run
        if run > 1 and not self.prompt_end_blocks:
            raise ValueError(f"prompt_end_run={run} fills the prompt end's places with runs of blocks, but there is no "
                             "vote: set prompt_end_blocks, or prompt_end_run: 1")
        if run > 1 and self.prompt_end_following:
            raise ValueError(f"prompt_end_run={run} and prompt_end_following={self.prompt_end_following} both bring "
                             "the voted blocks' neighbours: choose one (set the other to its default, 1 or 0)")
        if run > self.prompt_end_blocks > 0:
            raise ValueError(f"prompt_end_run={run} exceeds prompt_end_blocks={self.prompt_end_blocks}: a run "
                             "cannot be longer than the places it fills; lower prompt_end_run")
        shortlist = self.prompt_end_shortlist
        if shortlist is not None:
            if not self.prompt_end_blocks:
                raise ValueError(f"prompt_end_shortlist={shortlist} sizes the prompt end's vote, but there is no "
                                 "vote: set prompt_end_blocks, or prompt_end_shortlist: null")
            _check_int("prompt_end_shortlist", shortlist, self.prompt_end_blocks)
        if self.prompt_end_rise != "sum" and not self.prompt_end_blocks:
            raise ValueError(f"prompt_end_rise={self.prompt_end_rise!r} scores the prompt end's votes, but there is "
                             "no vote: set prompt_end_blocks, or prompt_end_rise: sum")
        if self.prompt_end_recent and not self.prompt_end_blocks:
            raise ValueError(f"prompt_end_recent={self.prompt_end_recent} adds the blocks formed after the prompt end's "
                             "vote to the voted ones, but there is no vote: set prompt_end_blocks, or "
                             "prompt_end_recent: 0")
        if self.prompt_end_baseline != "previous" and not self.prompt_end_blocks:
            raise ValueError(f"prompt_end_baseline={self.prompt_end_baseline!r} is the prompt end's vote's baseline, "
                             "but there is no vote: set prompt_end_blocks, or prompt_end_baseline: previous")
        if self.prompt_end_tally != "count" and not self.prompt_end_blocks:
            raise ValueError(f"prompt_end_tally={self.prompt_end_tally!r} weighs the prompt end's votes, but there is "
                             "no vote: set prompt_end_blocks, or prompt_end_tally: count")
        asked = self.prompt_end_queries
        if self.prompt_end_skip and asked is None:
            raise ValueError(f"prompt_end_skip={self.prompt_end_skip} skips queries before the prompt end's voting "
                             "ones, but none are chosen: set prompt_end_queries, or prompt_end_skip: 0")
        if asked is None:
            return
        _check_int("prompt_end_queries", asked, 1)
        if not self.prompt_end_blocks:
            raise ValueError(f"prompt_end_queries={asked} chooses the queries of the prompt end's vote, but there is "
                             "none: set prompt_end_blocks, or prompt_end_queries: null")
        if asked + self.prompt_end_skip > self.chunk_size:
            skipped = f" and prompt_end_skip={self.prompt_end_skip}" if self.prompt_end_skip else ""
            raise ValueError(f"prompt_end_queries={asked}{skipped} exceed chunk_size={self.chunk_size}: the vote "
                             "reads the prompt's last chunk; use at most chunk_size in all, or prompt_end_queries: "
                             "null for the whole chunk")

    def _check_score_decay(self) -> None:
        decay = self.score_decay
        if decay is not None:
            if isinstance(decay, bool) or not isinstance(decay, (int, float)):
                raise ValueError(f"score_decay={decay!r} is invalid: must be a number in (0, 1)")
            # YAML may give an int; store a float so that a round trip compares equal.
            object.__setattr__(self, "score_decay", float(decay))
        if self.cache_policy == "lru-s" and decay is None:
            raise ValueError("score_decay=None is invalid with cache_policy='lru-s': it needs a number in (0, 1)")
        if self.cache_policy != "lru-s" and decay is not None:
            raise ValueError(f"score_decay={decay!r} is only used by cache_policy 'lru-s', not "
                             f"{self.cache_policy!r}: remove score_decay or set cache_policy: lru-s")
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"score_decay={decay!r} is invalid: must be a number in (0, 1), exclusive")

    def _check_shared_decay(self) -> None:
        decay = self.shared_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"shared_decay={decay!r} is invalid: must be a number from 0 to 1")
        object.__setattr__(self, "shared_decay", float(decay))  # (YAML may give an int: 0 or 1)
        if decay and not self.shares_picks:
            raise ValueError(f"shared_decay={decay} weighs the shared choices, but nothing is shared: set "
                             "shared_blocks or shared_candidates, or shared_decay: 0")
        if self.shared_votes != "picks" and not self.shares_picks:
            raise ValueError(f"shared_votes={self.shared_votes!r} chooses what the layers share, but nothing is "
                             "shared: set shared_blocks or shared_candidates, or shared_votes: picks")

    def _check_tiers(self) -> None:
        if self.host_cache_bytes is not None:
            _check_int("host_cache_bytes", self.host_cache_bytes, 0, maximum=2**63 - 1)
        if self.disk_dir is not None and (not isinstance(self.disk_dir, str) or not self.disk_dir):
            raise ValueError(f"disk_dir={self.disk_dir!r} is invalid: must be a folder path or null")
        if self.disk_dir is not None and self.host_cache_bytes is None:
            raise ValueError(f"disk_dir={self.disk_dir!r} is only used with host_cache_bytes (blocks go to disk "
                             "only beyond that budget): set host_cache_bytes or remove disk_dir")

    def to_dict(self) -> dict[str, Any]:
        """The fields in declaration order: exactly what `to_yaml` writes and `load_config` reads."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> InfLLMConfig:
        """A copy with `changes` applied, validated like a new instance."""
        for key in changes:
            if key not in FIELD_NAMES:
                raise ValueError(f"{key!r} is not an InfLLMConfig field{suggest(key, FIELD_NAMES)}")
        return dataclasses.replace(self, **changes)

    def to_yaml(self, path: str | Path, header: str | None = None) -> None:
        """Write our flat format; `header` (any lines) becomes a comment block at the top."""
        lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
        body = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        Path(path).write_text("\n".join(lines + [body]) if lines else body, encoding="utf-8")


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(InfLLMConfig))
DEFAULTS = InfLLMConfig()
# Keys our flat format accepts besides the fields: what a preset was tuned for, not how InfLLM runs.
EXTRA_KEYS = ("model_path", "conv_template")


@dataclass(frozen=True)
class LoadedConfig:
    """A loaded file: the settings, plus what the file says about the model and chat template.

    `notes` name the keys of a reference-format file that were accepted but are not honoured, with why.
    `conv_template` is a fastchat template name; None means the tokenizer's own chat template.
    """

    config: InfLLMConfig
    notes: tuple[str, ...] = ()
    model_path: str | None = None
    conv_template: str | None = None


def suggest(key: Any, valid: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def optional_str(path: Path, key: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{path}: {key}={value!r} is invalid: must be a string or null")
    return value
