"""Entities' conflict summaries as this engine's last commit left them.

Reading and decoding an entity's summary row was the largest share of loading a
batch's detection state (docs/benchmarks.md), and the engine wrote that very
row in its previous commit. The entity's version, which the version upsert
returns under the entity's lock before detection starts, tells whether anyone
stored an operation of the entity since: every operation stored takes a version,
and a summary changes only with an operation stored (or is forgotten with it,
while detection is off). So a summary kept here with the version it was
written at is used only when the version just read is that one; any other
version, on this instance or another, reads the row.

A summary is taken out when used (the batch changes it in place, and a batch
that fails must not leave it changed here) and comes back only with a commit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from storage.conflict_summaries import Summary

EntityKey = tuple[str, str]

MAX_ENTITIES = 10_000
"""Summaries kept; the least recently written go first."""


class SummaryCache:
    def __init__(self, max_entities: int = MAX_ENTITIES) -> None:
        self.max_entities = max_entities
        self._kept: OrderedDict[EntityKey, tuple[int, Summary]] = OrderedDict()
        self._staged: list[tuple[EntityKey, int, Summary]] = []

    def take(self, key: EntityKey, version: int) -> Summary | None:
        """The entity's summary when it was written at `version`; it leaves the cache."""
        found = self._kept.pop(key, None)
        if found is None or found[0] != version:
            return None
        return found[1]

    def stage(self, written: Sequence[tuple[EntityKey, int, Summary]]) -> None:
        """The summaries the transaction under way writes, each with the entity's version
        once it commits."""
        self._staged = list(written)

    def commit(self) -> None:
        for key, version, summary in self._staged:
            self._kept.pop(key, None)
            self._kept[key] = (version, summary)
        while len(self._kept) > self.max_entities:
            self._kept.popitem(last=False)
        self._staged = []

    def drop(self) -> None:
        self._staged = []
