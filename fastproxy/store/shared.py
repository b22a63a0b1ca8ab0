"""SharedMap: a read-only mapping whose copy with a few entries changed shares the others with it.

What lets a reader apply a revocation to a snapshot of many keys without copying every key: the
entries are spread by hash over about √n dicts, and `changed` copies the tuple of those dicts and
the few it touches. For 10,000 entries: 100 dicts of about 100, so a change copies about 200
references instead of 10,000. A lookup costs one hash and one index more than a dict's. Iteration
goes dict by dict: in no useful order (callers that show entries sort them).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class SharedMap(Mapping[K, V]):
    __slots__ = ("_buckets", "_size")

    def __init__(self, entries: Mapping[K, V]):
        count = max(1, math.isqrt(len(entries)))
        buckets: list[dict[K, V]] = [{} for _ in range(count)]
        for key, value in entries.items():
            buckets[hash(key) % count][key] = value
        self._buckets: tuple[dict[K, V], ...] = tuple(buckets)
        self._size = len(entries)

    def changed(self, put: Mapping[K, V], removed: Iterable[K]) -> SharedMap[K, V]:
        """A copy with the entries of `put` set and the keys `removed` gone (absent ones ignored)."""
        buckets, copied, size = list(self._buckets), set(), self._size
        count = len(buckets)

        def bucket(key: K) -> dict[K, V]:
            index = hash(key) % count
            if index not in copied:
                buckets[index] = dict(buckets[index])
                copied.add(index)
            return buckets[index]
        for key in removed:
            size -= bucket(key).pop(key, _ABSENT) is not _ABSENT
        for key, value in put.items():
            entries = bucket(key)
            size += key not in entries
            entries[key] = value
        result: SharedMap[K, V] = SharedMap.__new__(SharedMap)
        result._buckets, result._size = tuple(buckets), size
        if size > 4 * count * count:  # grown far past √n a dict: spread it anew (amortised by the doubling)
            return SharedMap(result)
        return result

    def __getitem__(self, key: K) -> V:
        return self._buckets[hash(key) % len(self._buckets)][key]

    def get(self, key: K, default: Any = None) -> Any:
        return self._buckets[hash(key) % len(self._buckets)].get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets[hash(key) % len(self._buckets)]

    def __iter__(self) -> Iterator[K]:
        for entries in self._buckets:
            yield from entries

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"SharedMap({dict(self)!r})"


_ABSENT = object()
