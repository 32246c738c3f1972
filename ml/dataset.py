"""What training learns from: one row of the five features per stored operation, its
label, and when it arrived.

The definitions are point in time at **commit** granularity: an operation's features
see only what was committed before its own commit (rows with `stored_at` below its
`stored_at`; members with `joined_at` below it). Operations of one commit do not see
each other, which is what the online scorer can reproduce exactly: it reads the state
once per batch, before the batch's writes (issue 14, the skew test).

For an operation `o` (entity `t/id`, user `u`, device `d`, `edited_at` E,
`received_at` R, changed fields F = the keys of its `changes`), with W the
conflict window (`conflicts.window_s`) and "before" meaning committed earlier:

- `concurrent_editors`: distinct users other than `u` with operations before on the
  same entity edited in a minute that holds an instant within W of E: the minutes
  (`edited_at` // 60 s) from that of E - W to that of E + W, both included. (Minutes,
  not instants: the online scorer keeps who edited an entity per minute, a bounded
  counter, instead of reading the log; it counts everyone within W and at most a
  minute's more on each side.)
- `hours_since_last_sync`: hours from the latest `received_at` of `d`'s operations
  before to R, at least 0, at most the cap (`ml.first_sync_hours`); the cap when `d`
  has none;
- `user_conflict_rate`: (c + 1) / (n + 2), n = `u`'s operations before, c = `u`'s
  conflict members that joined before (`joined_at` < `o.stored_at`): a new user is
  0.5, neither 0 nor 1;
- `entity_edit_frequency`: operations before on the same entity edited in E's clock
  hour (`edited_at` // 1 h) or the 24 before it (hour counters, likewise);
- `field_overlap_score`: the mean over f in F of c_f / n_f, where n_f = operations
  before of type `t` that changed f and c_f = those of them that are conflict members
  that joined before; a field never seen counts 0, and no field (a delete) is 0.

Label: `o` is a member of a conflict (at the time of extraction). Operations whose
window has not closed (E + W after the extraction's `as_of`) are left out: a later
edit could still make them members.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FEATURES: tuple[str, ...] = (
    "concurrent_editors",
    "hours_since_last_sync",
    "user_conflict_rate",
    "entity_edit_frequency",
    "field_overlap_score",
)
"""The columns of `Dataset.X`, in this order, everywhere (training, serving, reports)."""

DEFAULT_FIRST_SYNC_HOURS = 168.0
"""`hours_since_last_sync` of a device's first operation, and the cap of every value."""


@dataclass(frozen=True)
class Dataset:
    """Rows in arrival order (`sync_log.id`): the order the time-ordered holdout cuts."""

    X: npt.NDArray[np.float64]
    """(n, len(FEATURES))"""
    y: npt.NDArray[np.int8]
    """1: the operation is a conflict member."""
    stored_at: npt.NDArray[np.int64]
    """Commit time of each row, µs since the epoch: what "the latest 20%" is cut on."""
    op_ids: list[str]

    def __len__(self) -> int:
        return len(self.y)
