"""Step 1 of the pipeline: who may ask, and whether this replica takes one more stream.

API keys, tenants and Redis rate limits come with the production-gateway issue; they plug
in here. What is here already: a per-replica bound on in-flight answers, refused at once
with 503 and Retry-After rather than queued without bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from ragline_common.errors import ApiError
from ragline_gateway.metrics import ACTIVE_STREAMS


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str = "public"


class Ticket:
    """Held for the life of one answer; `release` is idempotent."""

    def __init__(self, admission: Admission, caller: Caller) -> None:
        self.admission = admission
        self.caller = caller
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.inflight -= 1
            ACTIVE_STREAMS.dec()


class Admission:
    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.inflight = 0

    def admit(self, headers: dict[str, str]) -> Ticket:
        if self.inflight >= self.max_inflight:
            raise ApiError(
                503, "overloaded", "this gateway replica is at its stream limit; retry shortly",
                headers={"Retry-After": "1"},
            )  # fmt: skip
        self.inflight += 1
        ACTIVE_STREAMS.inc()
        return Ticket(self, Caller())
