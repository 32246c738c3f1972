"""An entity's conflict summary as its `conflict_windows` row keeps it.

The row's body is JSON: `[windows, versions]`, the field windows
(`handlers.conflict_windows`) and the latest operations by version
(`handlers.conflict_versions`). A body written before the versions were kept is
the windows object alone: it reads with no versions, and the detector starts
them from the batch that reads it.
"""

from __future__ import annotations

import msgspec

from handlers.conflict_versions import Versions
from handlers.conflict_windows import FieldWindow, windows_decoder


# gc=False: a plain record (no reference back to what holds it), kept by the thousand in
# the engine's caches, which the collector would otherwise walk at every collection
# (docs/decisions/0019-small-batches.md).
class Summary(msgspec.Struct, array_like=True, gc=False):
    windows: dict[str, FieldWindow]
    versions: Versions | None = None


_decode = msgspec.json.Decoder(Summary).decode
encode = msgspec.json.Encoder().encode


def decode(body: bytes) -> Summary:
    if body[:1] == b"[":
        return _decode(body)
    return Summary(windows_decoder.decode(body))
