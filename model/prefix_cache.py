"""A byte-bounded LRU cache of per-sequence model state after a shared prompt prefix.

RecurrentGemma's state after any number of tokens is a fixed few MB (RG-LRU and conv state plus
the attention ring buffer), exact at every token boundary: the state after a document, computed
once, continues every request that starts with that document. :class:`model.engine.Engine` keys
the states by the prefix's token ids and keeps them here, in host memory (so the device memory
plan is unaffected), one :class:`PrefixEntry` per prefix.

Entries are evicted least recently used first; the bytes held never exceed ``max_bytes``. An entry
larger than the whole budget is refused.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from typing import Any

import numpy as np

DEFAULT_PREFIX_CACHE_BYTES = 1 << 30  # 1 GiB: 62 prefixes of 2B in bfloat16, 1,920 of the CPU
# benchmark model (a state is the same size whatever the prefix length)


@dataclasses.dataclass
class PrefixEntry:
    """One sequence's state after a prefix.

    Attributes:
      state: The model cache of one sequence (a pytree of host arrays, no batch dimension).
      tokens: The prefix length: the position the continuation starts at.
      nbytes: Bytes held by ``state``.
      used: Whether a request has started from it yet (the engine counts the first use as the
        miss that computed it, later ones as hits).
    """

    state: Any
    tokens: int
    nbytes: int
    used: bool = False


def tree_nbytes(tree: Any) -> int:
    """Bytes of every array in a pytree of arrays (nested dicts, lists and tuples)."""
    if isinstance(tree, dict):
        return sum(tree_nbytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(tree_nbytes(v) for v in tree)
    return int(np.asarray(tree).nbytes)


class PrefixCache:
    """Prefix states by key, least recently used evicted first, within ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0  # bytes held now, never above max_bytes
        self.evictions = 0
        self._entries: OrderedDict[Hashable, PrefixEntry] = OrderedDict()  # oldest use first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is held (does not count as a use)."""
        return key in self._entries

    def __iter__(self) -> Iterator[Hashable]:
        """The keys, least recently used first."""
        return iter(list(self._entries))

    def get(self, key: Hashable) -> PrefixEntry | None:
        """The entry for ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def touch(self, keys: Iterable[Hashable]) -> None:
        """Marks the held ones of ``keys`` as used now, in order (the last is the most recent):
        what is about to be needed is evicted last."""
        for key in keys:
            if key in self._entries:
                self._entries.move_to_end(key)

    def put(self, key: Hashable, state: Any, tokens: int) -> PrefixEntry | None:
        """Stores ``state`` (replacing any entry for ``key``) as the most recently used, evicting
        the least recently used until it fits. Returns the entry, or None if ``state`` alone is
        over ``max_bytes`` (nothing is evicted then)."""
        nbytes = tree_nbytes(state)
        if nbytes > self.max_bytes:
            return None
        self.pop(key)
        while self.nbytes + nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
            self.evictions += 1
        entry = PrefixEntry(state, tokens, nbytes)
        self._entries[key] = entry
        self.nbytes += nbytes
        return entry

    def pop(self, key: Hashable) -> PrefixEntry | None:
        """Removes and returns the entry for ``key`` (None if absent); not an eviction."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def capacity(self, entry_bytes: int) -> int:
        """How many entries of ``entry_bytes`` fit the budget together."""
        return self.max_bytes // entry_bytes if entry_bytes > 0 else 0
