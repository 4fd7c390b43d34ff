"""Automatic prefix caching: K/V of earlier requests' tokens, kept in blocks and copied into a new request's row.

Why: in a multi-turn chat, turn k's prompt is turn k-1's prompt and answer plus one new message, so without a
cache every turn re-prefills the whole conversation; on a CPU that is seconds per thousand tokens of a 9B
model. Here any request whose prompt starts with tokens an earlier request (any request, not only the same
conversation) has already run prefills only the rest.

Design (vLLM's automatic prefix caching, with SGLang's LRU):
- The K/V of a finished or just-prefilled sequence are cut into blocks of :data:`BLOCK_TOKENS` tokens. A block
  is keyed by ``(its parent block's id, its tokens)``: a block's K/V depend on every token before it, so the key
  names the whole prefix exactly (dict lookup with tuple equality: no hash collision can return wrong K/V).
- A new prompt is matched block by block from its start; the longest held chain is copied into the sequence's
  row and prefill starts after it (at least one prompt token is always prefilled: its logits give the first
  token).
- Blocks are copied, not shared in place: the exported graph attends over one contiguous ``[row, heads,
  cache_len, dim]`` buffer per sequence (``docs/graph.md``), so a block cannot be referenced from two rows. A
  copy costs bytes per token of memory bandwidth (glm-4-9b fp16: 40 KiB/token, 1000 tokens ~ 10 ms), against a
  prefill of seconds.
- The blocks live in host memory for every engine (a GPU engine copies them over PCIe), and their total is held
  under a capacity the scheduler sets to what the KV budget leaves beside the pool; least recently used blocks
  go first (a lookup touches the chain leaf first, so a parent is always used more recently than its children
  and leaves are evicted before the prefixes they hang on).

Not thread-safe: the scheduler's engine thread is the only user; other threads only read the counters.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: Tokens per block: small enough that a conversation's new turn reuses nearly all of the old one, large
#: enough that per-block bookkeeping (a dict entry, one array) stays negligible beside the K/V bytes.
BLOCK_TOKENS = 16


@runtime_checkable
class SlotEngine(Protocol):
    """An engine that can copy a row's K/V slots to and from host memory (what prefix caching needs)."""

    def read_slots(self, cache: Any, row: int, start: int, stop: int) -> np.ndarray:
        """Slots ``[start, stop)`` of ``row`` as one host array ``[2 x layers, kv_heads, stop - start, ...]``."""
        ...

    def write_slots(self, cache: Any, row: int, start: int, data: np.ndarray) -> None:
        """Write ``data`` (as :meth:`read_slots` returns it) into slots ``[start, start + n)`` of ``row``."""
        ...


@dataclass(eq=False)
class Block:
    id: int
    key: tuple[int, tuple[int, ...]]
    parent: Block | None
    data: np.ndarray
    children: int = 0


@dataclass
class PrefixStats:
    """Counters for ``/metrics`` (monotonic) and the current size."""

    lookups: int = 0
    hits: int = 0  # lookups that reused at least one block
    hit_tokens: int = 0  # prompt tokens not prefilled thanks to the cache
    stored_blocks: int = 0
    evicted_blocks: int = 0
    bytes: int = 0
    blocks: int = 0
    capacity_bytes: int = 0


@dataclass
class PrefixCache:
    """Blocks of K/V keyed by their token prefix, least recently used evicted first."""

    engine: SlotEngine
    capacity_bytes: int
    block_tokens: int = BLOCK_TOKENS
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self) -> None:
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], Block] = OrderedDict()  # LRU first
        self._next_id = 1
        self.stats.capacity_bytes = self.capacity_bytes

    # ---- lookups --------------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int]) -> list[Block]:
        """The longest chain of held blocks that ``tokens`` starts with (touched: most recently used)."""
        chain: list[Block] = []
        parent = 0
        b = self.block_tokens
        for i in range(len(tokens) // b):
            blk = self._blocks.get((parent, tuple(tokens[i * b:(i + 1) * b])))
            if blk is None:
                break
            chain.append(blk)
            parent = blk.id
        for blk in reversed(chain):  # leaf first: the root ends up most recent, evicted last
            self._blocks.move_to_end(blk.key)
        return chain

    def load(self, pool: Any, row: int, chain: list[Block], tokens: int) -> int:
        """Copy the first ``tokens`` slots held by ``chain`` into ``row``; returns the slots written."""
        tokens = min(tokens, len(chain) * self.block_tokens)
        if tokens <= 0:
            return 0
        need = -(-tokens // self.block_tokens)
        data = np.concatenate([blk.data for blk in chain[:need]], axis=2)[:, :, :tokens]
        self.engine.write_slots(pool, row, 0, data)
        return tokens

    # ---- storing --------------------------------------------------------------------------------------
    def store(self, pool: Any, row: int, tokens: Sequence[int], valid: int) -> int:
        """Keep the whole blocks of ``tokens[:valid]`` (whose K/V are in ``row``) that are not held yet;
        returns the blocks added."""
        b = self.block_tokens
        full = min(valid, len(tokens)) // b
        if full == 0 or self.capacity_bytes <= 0:
            return 0
        chain = self.match(tokens[:full * b])
        first = len(chain)
        if first == full:
            return 0
        data = self.engine.read_slots(pool, row, first * b, full * b)
        block_bytes = data.nbytes // (full - first)
        if block_bytes > self.capacity_bytes:
            return 0
        parent = chain[-1] if chain else None
        added = 0
        for i in range(first, full):
            self._make_room(block_bytes, keep=parent)
            if self.stats.bytes + block_bytes > self.capacity_bytes:
                break
            key = (parent.id if parent else 0, tuple(tokens[i * b:(i + 1) * b]))
            part = np.ascontiguousarray(data[:, :, (i - first) * b:(i - first + 1) * b])
            blk = Block(self._next_id, key, parent, part)
            self._next_id += 1
            self._blocks[key] = blk
            if parent is not None:
                parent.children += 1
            self.stats.bytes += blk.data.nbytes
            parent = blk
            added += 1
        # The new leaves were added last (most recent); put the chain's older part after them, leaf first.
        for blk in reversed(chain):
            self._blocks.move_to_end(blk.key)
        self.stats.stored_blocks += added
        self.stats.blocks = len(self._blocks)
        return added

    # ---- memory ---------------------------------------------------------------------------------------
    def set_capacity(self, capacity_bytes: int) -> None:
        """A new bound (the pool grew or shrank): evict down to it at once."""
        self.capacity_bytes = self.stats.capacity_bytes = max(0, capacity_bytes)
        self._make_room(0)

    def clear(self) -> None:
        self._blocks.clear()
        self.stats.bytes = self.stats.blocks = 0

    def _make_room(self, extra: int, keep: Block | None = None) -> None:
        """Evict least recently used blocks until ``extra`` more bytes fit (never ``keep`` or its ancestors:
        the chain being extended)."""
        protected = set()
        while keep is not None:
            protected.add(keep.id)
            keep = keep.parent
        while self._blocks and self.stats.bytes + extra > self.capacity_bytes:
            victim = next((blk for blk in self._blocks.values() if blk.id not in protected), None)
            if victim is None:
                return
            self._evict(victim)
        self.stats.blocks = len(self._blocks)

    def _evict(self, blk: Block) -> None:
        """Remove ``blk`` and (unreachable without it) every block below it."""
        if blk.children:
            for child in [c for c in self._blocks.values() if c.parent is blk]:
                self._evict(child)
        del self._blocks[blk.key]
        if blk.parent is not None:
            blk.parent.children -= 1
        self.stats.bytes -= blk.data.nbytes
        self.stats.evicted_blocks += 1
