"""A small SSE reader for tests that records when each event arrived."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson


@dataclass
class Event:
    name: str
    data: Any
    at: float  # perf_counter when its last line arrived
    read: int  # index of the network read that delivered it


def read_events(response: httpx.Response, stop_after: str | None = None) -> list[Event]:
    """Parse `event:`/`data:` frames as they arrive, one network read at a time."""
    events: list[Event] = []
    buffer = b""
    name = "message"
    for read_no, chunk in enumerate(response.iter_raw()):
        buffer += chunk
        now = time.perf_counter()
        while b"\n\n" in buffer:
            frame, buffer = buffer.split(b"\n\n", 1)
            data = None
            for line in frame.decode().splitlines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
            if data is None:
                continue  # a `: ping` comment
            events.append(Event(name, orjson.loads(data), now, read_no))
            if stop_after and name == stop_after:
                return events
            name = "message"
    return events
