"""The context memory of a whole model: one `LayerMemory` per decoder layer (the full-attention baseline is
`inf_llm.memory.full_attention`).

Both kinds share one small interface used by the engine: `forward_kwargs()` (what the model call needs),
`snapshot()` / `restore()` (cheap rollback to a turn boundary), `state_dict()` / `load_state_dict()`
(version-1 sessions, full attention's sessions), `stats()` (what the chat and the benchmarks show), and
`num_tokens`.

`InfLLMMemory` also has the persistence API a session store uses (`inf_llm.sessions.store`): which tiers its
blocks and block summaries are saved in (`tier_layouts`), what to write (`write_all`, `write_unsaved`), what is
already on disk (`saved`, `uses_disk`), where to map a saved copy (`map_layer`, `use_disk`, `drop_disk`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from inf_llm.config.schema import InfLLMConfig
from inf_llm.kernels import resolve_ops
from inf_llm.memory.layer_memory import LayerMemory
from inf_llm.memory.layer_state import STATE_ADDED_LATER, LayerShape
from inf_llm.memory.ranking import tally_votes, voted_runs, with_following
from inf_llm.memory.retrieval_trace import RetrievalTrace
from inf_llm.memory.shared_picks import SharedPicks
from inf_llm.memory.stats import MemoryStats
from inf_llm.model.placement import layer_device
from inf_llm.model.rope import RotaryTable
from inf_llm.storage.block_layout import BlockLayout
from inf_llm.storage.disk_tier import DiskTier
from inf_llm.storage.dtypes import DTYPES
from inf_llm.storage.row_layout import RowLayout
from inf_llm.storage.spill import SpillDirectory
from inf_llm.storage.tier_settings import tier_settings


def storage_dtype_for(config: InfLLMConfig, model_dtype: torch.dtype) -> torch.dtype:
    if config.storage_dtype != "auto":
        return DTYPES[config.storage_dtype]
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.model.layers


@dataclass
class SavedBlocks:
    """A saved copy of a memory's blocks that its block stores use as their disk tiers (since the save or resume
    that made it): the session folder and its generation folder, and per layer the tier of the blocks and the tier
    of their summaries. A store that finds it on the memory it saves writes only what is not on disk yet."""

    folder: Path
    generation: str
    kv: list[DiskTier]
    reprs: list[DiskTier]


class InfLLMMemory:
    """InfLLM (and its stream-llm / infinite-lm baselines) for every layer of a patched model."""

    def __init__(self, model: torch.nn.Module, config: InfLLMConfig):
        if config.method == "full":
            raise ValueError("method 'full' uses FullAttentionMemory, not InfLLMMemory")
        mc = model.config
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        shape = LayerShape(mc.num_attention_heads, mc.num_key_value_heads, head_dim)
        self.config, self.shape = config, shape
        # Positions used: local keys 0..window+chunk-1; stream-llm's query up to sinks+window-1; the global stage's
        # query at the global distance (at most `farthest_distance`: the largest of the distance settings), and with ordered (or runs) memory
        # positions, the global keys 0..G-1 and the query at that distance + G-1, G = every global key a chunk
        # attends (sinks, retrieved blocks, the remainder under one block, the chunk's complement keys).
        max_position = max(config.farthest_distance, config.widest_window) + config.chunk_size + config.num_sink_tokens + 1
        if config.orders_memory:
            max_position += (config.retrieved_blocks + 1) * config.block_size  # + 1: the remainder
        tables: dict[torch.device, RotaryTable] = {}
        ops_for: dict[torch.device, object] = {}
        self.layers: list[LayerMemory] = []
        layers = decoder_layers(model)
        tiers = tier_settings(config.host_cache_bytes, config.disk_dir, len(layers))
        for index, layer in enumerate(layers):
            # Each layer's memory lives with that layer's weights, so it shards with a device_map.
            weight = layer.self_attn.q_proj.weight
            device = layer_device(layer)  # not weight.device: an offloaded layer's weights sit on "meta"
            if device not in tables:
                tables[device] = RotaryTable(model.model.rotary_emb, head_dim, max_position, device)
                ops_for[device] = resolve_ops(config.kernel_backend, device)
            self.layers.append(
                LayerMemory(
                    config,
                    shape,
                    tables[device],
                    ops_for[device],
                    dtype=weight.dtype,
                    storage_dtype=storage_dtype_for(config, weight.dtype),
                    device=device,
                    tiers=tiers[index],
                )
            )
        self.shared_picks = SharedPicks(config.shared_blocks, config.shared_candidates, config.shared_decay) \
            if config.shares_picks else None
        for index, layer in enumerate(self.layers):
            layer.index = index
            layer.shared_picks = self.shared_picks
        # Persistence (set by a session store): the saved copy the block stores use, and the private copy of a
        # read-only resumed session's blocks they map (removed by the store once they leave it).
        self.saved: SavedBlocks | None = None
        self.private_copy: SpillDirectory | None = None

    @property
    def num_tokens(self) -> int:
        return self.layers[0].num_seen

    def start_trace(self) -> RetrievalTrace:
        """Record what retrieval does from now on (see retrieval_trace.py), until `stop_trace`."""
        trace = RetrievalTrace(self.config.block_size, self.config.num_sink_tokens)
        for layer in self.layers:
            layer.trace = trace
        return trace

    def stop_trace(self) -> None:
        for layer in self.layers:
            layer.trace = None

    def force_blocks(self, block_ids: list[int] | None, from_position: int = 0) -> None:
        """Add these blocks to every layer's choice at every step from now on (those that exist yet), or stop
        (None); only to the chunks that hold a token at `from_position` or later (a chunk is ranked once for all
        its tokens, so the reading's chunks stay those of a run without the oracle). An oracle for analysis (the
        benchmark's `--needle-oracle`: is a needle enough once it is retrieved whole in every layer, and from
        where on must it be?), not a retrieval setting; the device cache must hold the top-k and them."""
        forced = None if block_ids is None else torch.tensor(sorted(set(block_ids)), dtype=torch.long)
        if forced is not None:
            cfg = self.config
            if cfg.per_head_ranking:
                raise ValueError("forced blocks need one choice per layer: per_head_ranking chooses per KV head")
            most = (max(cfg.topk_blocks, cfg.chunk_topk_blocks) + len(forced)) * (1 + cfg.following_blocks)
            if most > cfg.device_cache_blocks:
                raise ValueError(f"{len(forced)} forced blocks and the top-k need up to {most} device-cache "
                                 f"slots, more than device_cache_blocks={cfg.device_cache_blocks}")
        for layer in self.layers:
            layer.forced_blocks, layer.forced_from = forced, from_position

    def vote_prompt_end(self, read: Callable[[], object]) -> None:
        """prompt_end_blocks: `read()` reads the chunk that ends a prompt once for votes (each layer votes for the
        blocks whose exact logits rise most from the chunk before to it: `LayerMemory._vote_prompt_end`); the
        memory is then rolled back to before it, and from the next chunk on (the caller reads the same chunk again)
        every layer attends the prompt_end_blocks most voted blocks (ties: the lower id), through the reply, until
        the next prompt's end is voted on. A needle that the exact logits of a few layers single out is then read
        by all: on long prose the model needs it in every layer (a needle forced into layers 0-11, 12-24 or 25-29
        alone does not answer at 64K tokens; forced into all 30 it does).

        prompt_end_rounds: R reads the chunk for votes R times, each round attending every block the rounds before
        chose, and adding the prompt_end_blocks most voted that they did not: a question whose answer needs a
        second fact (the drawer that a code is kept in, then the number that drawer holds) names only the first,
        and the question's queries can look for the second once they have read the first.

        prompt_end_tally: how the layers' votes add up (`tally_votes`): each counts one, or by its rank in its layer.

        prompt_end_run: R fills the places with runs of up to R adjacent blocks around the most voted (`voted_places`):
        a fact's sentence cut by a block boundary comes back whole.

        prompt_end_recent: N: the ids of the first N blocks to form after the vote join the chosen ones; each is
        attended once it has formed (`LayerMemory._rank`). They hold the prose just before the chunk that ends the
        prompt (it leaves the local window while that chunk is read), then the prompt's own last tokens: a fact
        there was not a block when the question voted, and each decoding step's ranking alone found it whole in
        at most 3 of 30 layers (a 64K four-fact question whose fourth fact ended 170 tokens before the question)."""
        chosen = torch.empty(0, dtype=torch.long)
        num_blocks = self.layers[0].blocks.num_blocks  # the votes are cast over the memory as it was before the chunk
        for round_ in range(self.config.prompt_end_rounds):
            votes: list[list[int]] = []  # each layer's, best first
            snap = self.snapshot()
            traces = [layer.trace for layer in self.layers]
            for layer in self.layers:
                layer.end_votes, layer.trace = votes, None  # the trace records the chunk as it is read the last time
            try:
                read()
            finally:
                for layer, trace in zip(self.layers, traces):
                    layer.end_votes, layer.trace = None, trace
                self.restore(snap)
            tally = tally_votes(votes, self.config.prompt_end_tally)
            runs = voted_runs(tally, self.config.prompt_end_blocks, self.config.prompt_end_run, num_blocks,
                              set(chosen.tolist()))
            ranked = [block for run in runs for block in run]
            # prompt_end_following: the blocks after the voted ones too.
            voted = with_following(torch.tensor(sorted(ranked), dtype=torch.long), self.config.prompt_end_following,
                                   num_blocks)
            chosen = torch.cat((chosen, voted)).unique()  # ascending
            if round_ == 0:
                self._place_votes(tally, runs, ranked)
            for layer in self.layers:
                layer.end_blocks = chosen
        if self.config.prompt_end_recent:  # ids past the memory's last block: attended once formed
            recent = torch.arange(num_blocks, num_blocks + self.config.prompt_end_recent, dtype=torch.long)
            for layer in self.layers:
                layer.end_blocks = torch.cat((chosen, recent))

    def _place_votes(self, tally: Counter, runs: list[list[int]], ranked: list[int]) -> None:
        """Which of the first round's voted blocks voted_memory_distance places near (`end_near`; None: all of them).
        voted_memory_places: N, the first N places filled (the most voted first, with its run).
        voted_memory_consensus: F, the runs whose blocks' tally adds up to at least F times that of a block every
        layer ranks first (one vote per layer, by count or by rank: the number of layers); a run's blocks together,
        as a sentence cut by a block boundary splits the layers' votes (a 64K pass key: 0.50 and 0.49). Where the
        layers agree on a passage (on the embedded model a pass key in filler: its best block alone 0.58-0.83) it is
        read as near as a small window would place it, and the sinks with it (sink_memory_with_voted); where they
        spread their votes (one needle in prose: its best block 0.12-0.54; several, or distractors) every block
        stays at one distance, and the model weighs them by what they say."""
        places, consensus = self.config.voted_memory_places, self.config.voted_memory_consensus
        if places is None and consensus is None:
            return
        first = set(ranked[:places])  # `runs` in the order filled (places None: every place)
        if consensus is not None:
            runs = [run for run in runs if sum(tally.get(block, 0) for block in run) >= consensus * len(self.layers)]
        near = [block for run in runs for block in run if block in first]
        near_ids = torch.tensor(sorted(near), dtype=torch.long)
        for layer in self.layers:
            layer.end_near = near_ids

    def begin_prompt(self, num_tokens: int) -> None:
        """A prompt of `num_tokens` tokens is read next (the engine's feed of several tokens): the decoding steps
        that reply to it decode at decode_memory_distance when it is at least decode_memory_distance_from long."""
        for layer in self.layers:
            layer.prompt_tokens = num_tokens

    def clear_prompt_end(self) -> None:
        """A new prompt: what the last one's end voted for is attended no more."""
        for layer in self.layers:
            layer.end_blocks = layer.end_near = None

    def forward_kwargs(self, num_new: int, device: torch.device) -> dict:
        # Position ids of 0 make the model's own RoPE the identity; the layers rotate q and k themselves.
        return {
            "position_ids": torch.zeros((1, num_new), dtype=torch.long, device=device),
            "use_cache": False,
            "inf_llm_memory": self,
        }

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def snapshot(self) -> list[dict]:
        return [layer.snapshot() for layer in self.layers]

    def saved_snapshot(self) -> list[dict]:
        """`snapshot` as a saved session keeps it: with each layer's block codes (ranking_code_rank), which a
        rollback keeps by count but a resumed memory reads back rather than computes again."""
        return [layer.saved_snapshot() for layer in self.layers]

    def restore(self, snap: list[dict]) -> None:
        for layer, s in zip(self.layers, snap):
            layer.restore(s)

    def state_dict(self) -> dict:
        return {"layers": [layer.state_dict() for layer in self.layers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["layers"]) != len(self.layers):
            raise ValueError(f"saved memory has {len(state['layers'])} layers, the model has {len(self.layers)}")
        for layer, s in zip(self.layers, state["layers"]):
            layer.load_state_dict(s)

    def stats(self) -> MemoryStats:
        counts = [layer.counts() for layer in self.layers]
        first = counts[0]
        return MemoryStats(
            tokens=self.num_tokens,
            window_tokens=first["window"],
            sink_tokens=first["sinks"],
            remainder_tokens=first["remainder"],
            block_tokens=first["blocks"] * self.config.block_size,
            blocks=first["blocks"],
            device_blocks=sum(c["resident_blocks"] for c in counts),
            host_blocks=sum(c["blocks"] for c in counts),
            cache_hits=sum(c["hits"] for c in counts),
            cache_misses=sum(c["misses"] for c in counts),
            host_bytes=sum(c["host_bytes"] for c in counts),
            device_bytes=sum(c["device_bytes"] for c in counts),
        )

    # --- persistence: the API of a session store (inf_llm/sessions/store.py) -----------------------------------

    @property
    def summary_dtype(self) -> torch.dtype:
        """The dtype of the block summaries (representatives or key bounds), `repr_dtype`."""
        return self.layers[0].repr_dtype

    def block_counts(self) -> list[int]:
        return [layer.blocks.num_blocks for layer in self.layers]

    def tier_layouts(self) -> list[tuple[BlockLayout, RowLayout]]:
        """Per layer, the layouts of the two tiers a saved copy has: the blocks' records, the summaries' rows."""
        return [(layer.blocks.layout, RowLayout(layer.repr_rows * layer.shape.head_dim, layer.config.repr_dtype))
                for layer in self.layers]

    def write_all(self, kv: list[DiskTier], reprs: list[DiskTier]) -> None:
        """Write every block and block summary into new, empty tiers (`tier_layouts`), one of each per layer."""
        for layer, kv_tier, row_tier in zip(self.layers, kv, reprs):
            layer.blocks.copy_to(kv_tier)
            _write_rows(row_tier, layer.reprs, 0, layer.blocks.num_blocks)

    def write_unsaved(self, kv: list[DiskTier], reprs: list[DiskTier]) -> None:
        """Write what the tiers the block stores use (`uses_disk(kv)`) do not hold yet: the blocks only in RAM, and
        the summaries of the blocks made since the last `mark_saved` (rows of blocks a rollback forgot are cut)."""
        for layer, kv_tier, row_tier in zip(self.layers, kv, reprs):
            layer.blocks.flush()  # blocks still only in RAM
            valid = min(layer.mark_blocks(), len(row_tier))  # rows of blocks that no rollback forgot
            row_tier.truncate(valid)
            _write_rows(row_tier, layer.reprs, valid, layer.blocks.num_blocks)

    def mark_saved(self) -> None:
        """Blocks held now are saved: `write_unsaved` writes the summaries of later ones only."""
        for layer in self.layers:
            layer.mark_blocks()

    def uses_disk(self, kv: list[DiskTier]) -> bool:
        """Whether each layer's block store uses that layer's tier in `kv` as its disk tier."""
        return all(layer.blocks.disk is tier for layer, tier in zip(self.layers, kv))

    def use_disk(self, kv: list[DiskTier]) -> None:
        """Make each layer's tier in `kv`, which holds exactly its blocks (`write_all`), its store's disk tier."""
        for layer, tier in zip(self.layers, kv):
            layer.blocks.set_disk(tier)

    def drop_disk(self, which: Callable[[DiskTier], bool]) -> None:
        """Let the block stores forget the disk tiers `which` names, without writing to them (before a reset)."""
        for layer in self.layers:
            if layer.blocks.disk is not None and which(layer.blocks.disk):
                layer.blocks.set_disk(None)

    def forget_saved(self) -> None:
        """Let the block stores forget the saved session's tiers (`saved`), without writing to them: the session
        must stay exactly as it was."""
        saved, self.saved = self.saved, None
        if saved is not None:
            self.drop_disk(lambda tier: any(tier is mine for mine in saved.kv))

    def remove_copy(self, copy: SpillDirectory | None) -> None:
        """Remove a private copy of a read-only resumed session's blocks, once the stores forget its tiers."""
        if copy is None:
            return
        if copy.root is not None:
            # A reset store holds no block of it; the next to leave RAM goes elsewhere.
            self.drop_disk(lambda tier: tier.path.is_relative_to(copy.root))
        copy.remove()

    def map_layer(self, index: int, kv: DiskTier, num_blocks: int, reprs: torch.Tensor, state: dict) -> None:
        """Give layer `index` blocks 0..num_blocks-1 of the tier `kv` (read when retrieval asks), their summaries
        (the first num_blocks rows of `reprs`, (N >= num_blocks, width): a fresh copy, which the layer may keep as
        its buffer, the other rows its room to grow) and the rest of its state (a `snapshot` entry of a saved
        memory). ValueError if the state is not one of this memory's."""
        layer = self.layers[index]
        _check_layer_state(layer, state)
        r, d = layer.repr_rows, layer.shape.head_dim
        layer.load_blocks(kv, num_blocks, reprs.reshape(reprs.shape[0], r, d), state)


def _write_rows(tier: DiskTier, reprs: torch.Tensor, start: int, end: int, batch: int = 4096) -> None:
    layout = tier.layout
    for a in range(start, end, batch):
        b = min(end, a + batch)
        tier.write(range(a, b), layout.records(reprs[a:b].reshape(b - a, layout.width)))


def _check_layer_state(layer: LayerMemory, saved: dict) -> None:
    """ValueError unless a layer's saved state has the entries of this engine's, each of its type, and tensors of
    its dtype and shape but for the token dimension (1)."""
    for key, mine in layer.snapshot().items():
        if key in STATE_ADDED_LATER and key not in saved:
            continue  # sessions saved before it was part of the state (recomputed, or no reuse)
        value = saved.get(key)
        if isinstance(mine, torch.Tensor):
            fits = isinstance(value, torch.Tensor) and value.dtype == mine.dtype and value.dim() == mine.dim() \
                and all(a == b for i, (a, b) in enumerate(zip(value.shape, mine.shape)) if i != 1)
        else:
            fits = type(value) is type(mine)
        if not fits:
            raise ValueError(f"the saved layer state's {key!r} is not of this engine's type or shape")
