"""A process's memory of content-addressed values it stored or read lately, bounded by bytes.

The key names the content, so a remembered value can never be stale: no invalidation, across
processes or otherwise. Least recently used first out once over the limit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    def __init__(self, limit: int, size: Callable[[V], int]) -> None:
        self._limit, self._total, self._size = limit, 0, size
        self._values: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        size = self._size(value)
        if key in self._values or size > self._limit:
            return
        self._values[key] = value
        self._total += size
        while self._total > self._limit:
            _, old = self._values.popitem(last=False)
            self._total -= self._size(old)
