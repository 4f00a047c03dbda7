"""Name-based ids (UUID version 5) as text, derived without UUID objects: a few per event on the service's path
and per answer in the worker SDK."""

from __future__ import annotations

import hashlib


def uuid5_text(namespace: bytes, name: str) -> str:
    """`str(uuid.uuid5(uuid.UUID(bytes=namespace), name))`, the same text, in a third of the time."""
    d = bytearray(hashlib.sha1(namespace + name.encode()).digest()[:16])
    d[6] = (d[6] & 0x0F) | 0x50  # version 5
    d[8] = (d[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = d.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
