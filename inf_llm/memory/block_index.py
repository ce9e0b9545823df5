"""An exact index over the block summaries: the top-k blocks of a chunk without scoring every block.

Ranking (`ranking.block_scores` then `select_blocks`) reads every summary of every layer for each decoded
token: at 1M tokens, 65K blocks x 30 layers x 768 bytes of float16 key bounds, 1.5 GB per token. `BlockIndex`
groups consecutive blocks by `group_size` and keeps, per group, per-coordinate upper and lower bounds of its
members' summaries. A query ranks the groups by a bound on their best member's score, opens the best groups
(scores their blocks with `block_scores` itself), and stops once no unopened group can hold a block that beats
the k-th best found: the result is `select_blocks(block_scores(...), k)`, ties and all.

Why exact, step by step (q the flattened ranking query, r_b a block's flattened summary):

- Group bound. With hi_j, lo_j the max and min of coordinate j over the group's blocks, q_j r_bj <=
  max(q_j hi_j, q_j lo_j) for every member b, so T_g = relu(q) . hi + min(q, 0) . lo >= q . r_b (real numbers).
  For `bounds` summaries (rows (max, min) per KV head, `ranking.key_bounds`), the query is >= 0 on max rows and
  <= 0 on min rows (`ranking_query`), so only hi of max rows and lo of min rows count: the stored bound is the
  key bounds of the union of the group's blocks (a coarser block), one summary's size per group. For
  `representatives` both hi and lo are stored (two summaries' size).
- Rounding. Scores are computed in floating point; the bound must exceed the *computed* score. A dot product of
  n terms computed in any order with unit roundoff u (float32 accumulation: u = 2**-24; products of float16 are
  exact in float32) is within gamma_n * sum|q_j r_bj| of the real value, gamma_n = n u / (1 - n u) (Higham,
  Accuracy and Stability, 3.1), and sum|q_j r_bj| <= S_g = sum|q_j| * M_g, M_g the group's largest |summary|.
  float32 summaries: score_b <= T_b + gamma S_g <= T_g + gamma S_g <= B_g + 2 gamma S_g, B_g the computed bound.
  float16 summaries: the score is the float16 rounding of a float32-accumulated product (torch's CPU kernel; the
  bound takes u = 2**-11 where torch allows reduced-precision float16 reductions), and so is B_g, so with
  u16 = 2**-11: T_g <= B_g + u16 |B_g| / (1 - u16) + 2**-25 + gamma S_g = X (2**-25: float16's subnormal
  spacing / 2), and score_b <= fl16(X) <= X + u16 |X| + 2**-25 (rounding is monotone). The bound used is that,
  computed in float64 (its own rounding is ~1e-16 relative, absorbed by a 2**-20 relative pad).
- Ties. `select_blocks` orders blocks by (score descending, index ascending). A group is pruned when its bound is
  below the k-th best opened (score, index): bound < s_k, or bound == s_k and its first block comes after i_k.
  Every unopened block is then strictly behind k opened ones, so the top-k of the opened blocks is the top-k.
- Same scores. Opened blocks are scored by `block_scores` itself on their gathered summaries, in the layout of
  the given ones (column-major stays column-major), so the scores are bit-identical where a product's row does
  not depend on the call's other rows. Measured (tests/test_block_index.py, torch 2.13 + MKL, AVX2): true for
  float16 rows and columns and float32 columns (LayerMemory's layouts), summed or per head, given two rules
  that `_gather` applies: a column-major subset has at least two columns (one column is also a contiguous row
  and takes another kernel), and for rows, MKL computes four rows at a time and a call's last n % 4 rows with a
  kernel whose float32 values differ in the last bit and depend on how many tail rows it gets, so body rows are
  padded to a multiple of `_ROW_BLOCK` and the full product's whole tail follows them. One exception stays
  unexplained: per-head float16 (`einsum`) with head_dim 16 gave a 1-ulp different score for one row in about
  800 gathered calls (none in ~3000 calls with head_dim 64, the models' size); per-head float16 is not the
  default preset, and scoring each KV head with its own `mv` would make it row-independent. float32 does not
  stay bit-exact in general (torch 2.13's MKL, measured 2026-12-02 on an AVX-512 CPU): one thread computes
  column-major rows 16 at a time (rows 4 at a time, as on AVX2), and with two threads MKL splits the rows
  between the threads, so which kernel a row gets depends on the product's length: gathered rows differ from
  the full product by up to 8 ulps. float16 summaries (every preset's) stay bit-exact there too. So with
  float32 summaries the index's choice equals brute force's except between blocks whose scores lie within
  float32's error bound of each other (duplicated text), which the tests check.

Search: all group bounds are scored (one product over n / G rows), then groups are opened best-bound first in
vectorised rounds (the first ~2k/G groups, then doubling batches of the groups that can still beat the k-th best),
so a chunk costs a few rounds of tensor operations, not a Python step per group. Per-head ranking runs one search
per KV head together (the union of their opened groups is scored once).

Size: one group bound per `group_size` blocks; for the default preset (float16 key bounds, 16-token blocks,
SmolLM2's 3 KV heads x 64) 768 bytes + 4 per group: 3.0 bytes per token of history per layer at G=16
(summaries: 48), 1.5 at G=32.

Measured on the embedded model's memory of prose (default preset; `python -m inf_llm.bench.ranking_index`,
4K and 16K tokens, 2 loaded cores): exact pruning does NOT pay off on these summaries. Every group of G >= 4
consecutive blocks has a bound above the best block's score, at every layer, so the search opens all of them
and reads 1 + 1/G of the summaries (1.06 at G = 16), slower than brute force by the search's overhead. The
reason is dimension: the union's key bounds add, over 384 coordinates, each coordinate's spread across the
group, while the scores of a layer's blocks differ by a few percent (16K tokens, one query: best 438, 64th 406,
median 374; the lowest G = 16 group bound 478). Pairs (G = 2) prune some (a quarter to a half of the groups),
still reading more than brute force (0.5 for the bounds alone). Also measured, offline on the same data: groups
of k-means neighbours instead of consecutive blocks (G = 16: under 3% of groups prunable, even against the best
score) and a PCA projection with a residual bound (64 of 384 dims: 78-97% of blocks still to open). The class is
kept as the exact, tested mechanism and for summaries whose scores separate more (it reads 1/G of the summaries
plus the opened groups when they do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from inf_llm.memory.ranking import block_scores, fp16_ranking_query, select_blocks

# MKL's float32 matrix-vector product over row-major rows works four rows at a time; a call's last n % 4 rows go
# through another kernel (last-bit differences). Measured on torch 2.13 + MKL 2024.2 (AVX2); the tests check it.
_ROW_BLOCK = 4
_U16 = 2.0**-11
_U32 = 2.0**-24
_PAD = 1.0 + 2.0**-20


@dataclass
class SearchStats:
    """What the last `select` read: group bounds scored, blocks opened (scored exactly), rounds, blocks held."""

    groups: int = 0
    opened_blocks: int = 0
    rounds: int = 0
    num_blocks: int = 0
    bound_rows: int = 1  # summaries' worth of bytes per group bound (2 for representatives)

    @property
    def fraction_read(self) -> float:
        """Bytes read / bytes of all summaries (1.0 for brute force)."""
        if not self.num_blocks:
            return 0.0
        return (self.groups * self.bound_rows + self.opened_blocks) / self.num_blocks


class BlockIndex:
    """Group bounds over one layer's block summaries; `select` gives `select_blocks(block_scores(...), k)`.

    rows, head_dim: a summary's shape (R, D); num_kv_heads: Hkv; block_ranking: "bounds" (rows (max, min) per KV
    head) or "representatives"; dtype: the summaries' (float16 or float32, the bounds are kept in it).
    Blocks are grouped by index: group g holds blocks g*G .. g*G+G-1, so `append` touches the last group and new
    ones, and `truncate` recomputes the last kept group only.
    """

    def __init__(self, rows: int, head_dim: int, num_kv_heads: int, *, block_ranking: str = "bounds",
                 group_size: int = 16, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu"):
        if block_ranking not in ("bounds", "representatives"):
            raise ValueError(f"block_ranking must be bounds or representatives, got {block_ranking!r}")
        if block_ranking == "bounds" and rows != 2 * num_kv_heads:
            raise ValueError(f"key bounds have 2 * num_kv_heads = {2 * num_kv_heads} rows, got {rows}")
        if rows % num_kv_heads or group_size < 1:
            raise ValueError("rows must be a multiple of num_kv_heads and group_size >= 1")
        self.rows, self.head_dim, self.num_kv_heads = rows, head_dim, num_kv_heads
        self.block_ranking, self.group_size, self.dtype = block_ranking, group_size, dtype
        self.device = torch.device(device)
        self.width = rows * head_dim * (1 if block_ranking == "bounds" else 2)  # a group bound's coordinates
        self.num_blocks = 0
        self._bounds = torch.empty((0, self.width), dtype=dtype, device=self.device)
        self._absmax = torch.empty((0,), dtype=torch.float32, device=self.device)  # M_g
        self.last = SearchStats()

    @classmethod
    def build(cls, summaries: torch.Tensor, num_kv_heads: int, **kwargs) -> "BlockIndex":
        """The index of existing summaries (N, R, D) at once (a resumed session, `set_reprs`)."""
        n, rows, d = summaries.shape
        index = cls(rows, d, num_kv_heads, dtype=summaries.dtype, device=summaries.device, **kwargs)
        index.append(summaries)
        return index

    # --- upkeep ---------------------------------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        return -(-self.num_blocks // self.group_size)

    def nbytes(self) -> int:
        """Bytes the index holds for its groups (without spare capacity)."""
        g = self.num_groups
        return g * (self.width * self._bounds.element_size() + 4)

    def _group_bounds(self, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, m, R, D) summaries of g groups of m blocks -> their bounds (g, width) and M_g (g,)."""
        g, m = members.shape[:2]
        hkv, d = self.num_kv_heads, self.head_dim
        hi, lo = members.amax(dim=1), members.amin(dim=1)  # (g, R, D)
        absmax = torch.maximum(hi.abs().amax(dim=(1, 2)), lo.abs().amax(dim=(1, 2))).float()
        if self.block_ranking == "bounds":
            # Rows (max, min) per KV head: the max of the max rows, the min of the min rows.
            bounds = torch.stack((hi.view(g, hkv, 2, d)[:, :, 0], lo.view(g, hkv, 2, d)[:, :, 1]), dim=2)
        else:
            # Per KV head, its query group's rows of hi then of lo: each head's coordinates contiguous.
            per = (self.rows // hkv) * d
            bounds = torch.stack((hi.reshape(g, hkv, per), lo.reshape(g, hkv, per)), dim=2)
        return bounds.reshape(g, self.width).to(self.dtype), absmax

    def _reserve(self, groups: int) -> None:
        if groups > self._bounds.shape[0]:
            capacity = max(groups, 2 * self._bounds.shape[0], 16)
            grown = torch.empty((capacity, self.width), dtype=self.dtype, device=self.device)
            grown_absmax = torch.empty((capacity,), dtype=torch.float32, device=self.device)
            used = self.num_groups
            grown[:used], grown_absmax[:used] = self._bounds[:used], self._absmax[:used]
            self._bounds, self._absmax = grown, grown_absmax

    def append(self, new: torch.Tensor) -> None:
        """Add the summaries (n, R, D) of the next n blocks: merges into the last group while it has room
        (max/min with its bound: its earlier members are not read again), then fills new groups."""
        n = new.shape[0]
        if n == 0:
            return
        if new.shape[1:] != (self.rows, self.head_dim):
            raise ValueError(f"summaries of shape {tuple(new.shape[1:])}, the index has {(self.rows, self.head_dim)}")
        new = new.to(self.dtype)
        G = self.group_size
        self._reserve(-(-(self.num_blocks + n) // G))
        used = self.num_blocks % G
        taken = 0
        if used:
            taken = min(G - used, n)
            last = self.num_groups - 1
            b, m = self._group_bounds(new[:taken][None])
            # Both layouts keep (upper, lower) halves per KV head: merge with max and min.
            old_half, new_half = self._bounds[last].view(self.num_kv_heads, 2, -1), b[0].view(self.num_kv_heads, 2, -1)
            old_half[:, 0] = torch.maximum(old_half[:, 0], new_half[:, 0])
            old_half[:, 1] = torch.minimum(old_half[:, 1], new_half[:, 1])
            self._absmax[last] = torch.maximum(self._absmax[last], m[0])
        rest = new[taken:]
        self.num_blocks += taken
        if rest.shape[0]:
            full = rest.shape[0] // G
            g0 = self.num_groups
            if full:
                b, m = self._group_bounds(rest[: full * G].reshape(full, G, self.rows, self.head_dim))
                self._bounds[g0 : g0 + full], self._absmax[g0 : g0 + full] = b, m
            if rest.shape[0] > full * G:
                b, m = self._group_bounds(rest[full * G :][None])
                self._bounds[g0 + full], self._absmax[g0 + full] = b[0], m[0]
            self.num_blocks += rest.shape[0]

    def truncate(self, num_blocks: int, summaries: torch.Tensor) -> None:
        """Keep blocks 0..num_blocks-1 (a rollback); `summaries` holds at least those (the layer's, any layout):
        the last kept group is recomputed from its members when the cut falls inside it."""
        if num_blocks > self.num_blocks:
            raise ValueError(f"cannot truncate {self.num_blocks} blocks to {num_blocks}")
        self.num_blocks = num_blocks
        cut = num_blocks % self.group_size
        if cut:
            g = num_blocks // self.group_size
            b, m = self._group_bounds(summaries[g * self.group_size : num_blocks][None].to(self.dtype))
            self._bounds[g], self._absmax[g] = b[0], m[0]

    # --- search ---------------------------------------------------------------------------------------------

    def _gamma(self, n: int, summaries: torch.Tensor) -> float:
        u = _U32
        if summaries.dtype == torch.float16:
            reduced = (torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
                       if summaries.device.type == "cuda" else torch._C._get_cpu_allow_fp16_reduced_precision_reduction())
            u = _U16 if reduced else _U32
        return n * u / (1 - n * u)

    def group_bounds(self, query: torch.Tensor, per_head: bool, summary_absmax: torch.Tensor | None,
                     summaries: torch.Tensor) -> torch.Tensor:
        """(H, num_groups) float64 upper bounds of every member's `block_scores` (H = Hkv per head, else 1)."""
        hkv, rows, d = self.num_kv_heads, self.rows, self.head_dim
        g = self.num_groups
        if summaries.dtype == torch.float16:
            q = fp16_ranking_query(query, summary_absmax, on_host=query.device.type == "cpu")  # as block_scores
        else:
            q = query.float()
        if self.block_ranking == "bounds":
            signs = q.view(hkv, 2, d)
            if (signs[:, 0] < 0).any() or (signs[:, 1] > 0).any():
                raise ValueError("a key-bounds query must be >= 0 on max rows and <= 0 on min rows (ranking_query)")
            qb = q.reshape(hkv, -1)
        else:
            per = q.reshape(hkv, -1)
            qb = torch.stack((per.clamp(min=0), per.clamp(max=0)), dim=1).reshape(hkv, -1)
        bounds = self._bounds[:g]
        heads = hkv if per_head else 1
        if per_head:
            b = torch.einsum("nkg,kg->kn", bounds.view(g, hkv, -1), qb)
        else:
            b = torch.mv(bounds, qb.reshape(-1))[None]
        b = b.double()
        qabs = q.double().abs().reshape(heads, -1).sum(dim=1, keepdim=True)  # (H, 1)
        s = qabs * self._absmax[:g].double()[None]  # S_g, (H, G)
        n_terms = bounds.shape[1] // heads
        gamma = self._gamma(n_terms, summaries)
        if summaries.dtype == torch.float16:
            x = b + b.abs() * (_U16 / (1 - _U16)) + 2.0**-25 + 2 * gamma * s
            upper = x + x.abs() * _U16 + 2.0**-25
        else:
            upper = b + 2 * gamma * s + 1e-30 * n_terms
        return (upper + upper.abs() * (_PAD - 1)).view(heads, g)

    def _gather(self, summaries: torch.Tensor, ids: torch.Tensor, per_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The summaries of blocks `ids` (ascending) in the layout of `summaries`, and where each id's row is.

        Column-major: the columns of the (R*D, N) buffer, at least two (a single column is also a contiguous row,
        and torch then takes another kernel). Rows: MKL computes a product's rows four at a time and the last
        n % 4 rows of a call with another kernel (float32 values differ in the last bit): the rows the full
        product computes in its body are padded to a multiple of `_ROW_BLOCK` (repeating the last one), and its
        tail rows (all of the last N % 4 blocks) follow, so every row keeps its kernel."""
        n, rows, d = summaries.shape
        flat = summaries.reshape(n, rows * d)
        m = ids.shape[0]
        if flat.stride(0) == 1 and n > 1:
            padded = ids if m > 1 else ids.expand(2)
            sub = flat.t().index_select(1, padded).t()
            return sub.view(-1, rows, d), torch.arange(m, device=ids.device)
        body_end = n - n % _ROW_BLOCK
        in_body = ids < body_end
        body = ids[in_body]
        pad = -body.shape[0] % _ROW_BLOCK if body.shape[0] else 0
        where = torch.arange(m, device=ids.device)
        if bool(in_body.all()):
            order = torch.cat((body, body[-1:].expand(pad))) if pad else ids
        else:
            # The tail kernel's values depend on how many rows it gets: give it all of the full product's tail.
            order = torch.cat((body, body[-1:].expand(pad), torch.arange(body_end, n, device=ids.device)))
            where[body.shape[0]:] = body.shape[0] + pad + (ids[~in_body] - body_end)
        return flat.index_select(0, order).view(-1, rows, d), where

    def select(self, summaries: torch.Tensor, query: torch.Tensor, k: int, *, per_head: bool = False,
               summary_absmax: torch.Tensor | None = None, first_groups: int | None = None) -> torch.Tensor:
        """`select_blocks(block_scores(summaries, query, Hkv, per_head, summary_absmax), k)`, reading a fraction.

        summaries: the layer's (N, R, D) view that the index was built from (N = num_blocks), any layout.
        first_groups: groups opened in the first round (default 2 * ceil(k / G)); later rounds double.
        Statistics of the search are left in `self.last`.
        """
        n = summaries.shape[0]
        if n != self.num_blocks:
            raise ValueError(f"the index holds {self.num_blocks} blocks, the summaries {n}")
        hkv, G, dev = self.num_kv_heads, self.group_size, summaries.device
        heads = hkv if per_head else 1
        ngroups = self.num_groups
        self.last = SearchStats(num_blocks=n, bound_rows=self.width // (self.rows * self.head_dim))
        if n <= k:
            return select_blocks(torch.zeros((hkv, n) if per_head else (n,), device=dev), k)
        upper = self.group_bounds(query, per_head, summary_absmax, summaries)  # (H, ngroups)
        self.last.groups = ngroups
        first = torch.arange(ngroups, device=dev) * G  # each group's first block
        opened = torch.zeros(ngroups, dtype=torch.bool, device=dev)
        top_ids = torch.empty((heads, 0), dtype=torch.long, device=dev)
        top_scores = torch.empty((heads, 0), dtype=torch.float32, device=dev)
        batch = first_groups or 2 * -(-k // G)
        offsets = torch.arange(G, device=dev)
        rounds = opened_blocks = 0
        while True:
            if top_ids.shape[1] < k:
                needed = ~opened[None].expand(heads, -1)
            else:
                kth_score = top_scores[:, k - 1 : k].double()
                kth_id = top_ids[:, k - 1 : k]
                needed = ~opened[None] & ((upper > kth_score) | ((upper == kth_score) & (first[None] < kth_id)))
            if not bool(needed.any()):
                break
            take = min(batch, ngroups)
            picked = torch.topk(torch.where(needed, upper, -math.inf), take, dim=1)
            chosen = picked.indices[needed.gather(1, picked.indices)]
            new_groups = torch.unique(chosen)  # ascending
            opened[new_groups] = True
            ids = (first[new_groups][:, None] + offsets).flatten()
            ids = ids[ids < n]
            sub, where = self._gather(summaries, ids, per_head)
            scores = block_scores(sub, query, hkv, per_head, summary_absmax)
            scores = scores.view(heads, -1)[:, where]
            opened_blocks += ids.shape[0]
            rounds += 1
            # Top-k of (previous top-k + new blocks) in select_blocks' order: score descending, id ascending.
            cand_ids = torch.cat((top_ids, ids[None].expand(heads, -1)), dim=1)
            cand_scores = torch.cat((top_scores, scores), dim=1)
            by_id = cand_ids.argsort(dim=1)
            cand_ids, cand_scores = cand_ids.gather(1, by_id), cand_scores.gather(1, by_id)
            order = torch.sort(cand_scores, dim=1, descending=True, stable=True).indices[:, :k]
            top_ids, top_scores = cand_ids.gather(1, order), cand_scores.gather(1, order)
            batch *= 2
        self.last.opened_blocks, self.last.rounds = opened_blocks, rounds
        chosen = top_ids.sort(dim=1).values
        return chosen if per_head else chosen[0]
