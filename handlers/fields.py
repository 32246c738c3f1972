"""The constrained types that payloads and admin arguments are decoded into.

msgspec checks them while it parses, and reports the JSON path of a value that
breaks them: one definition each, shared by every decoder.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from msgspec import Meta

Str64 = Annotated[str, Meta(min_length=1, max_length=64)]
Str128 = Annotated[str, Meta(min_length=1, max_length=128)]
DeviceId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
AwareTime = Annotated[datetime, Meta(tz=True)]
"""RFC 3339 with an offset: a time without one is a `schema` error."""
Version = Annotated[int, Meta(ge=0, le=2**63 - 1)]
