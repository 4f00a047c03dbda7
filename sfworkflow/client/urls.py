"""Broker URLs: a cluster's nodes are named by several URLs separated by commas (SFWORKFLOW_AMQP_URL, and the URL the
client's producers and worker take)."""

from __future__ import annotations

import re

# A comma that starts the next URL of a list: one followed by a scheme. A comma inside a URL (a %-unencoded one in a
# password, or PostgreSQL's list of hosts) is not followed by `scheme://`.
_NEXT_URL = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(url: str) -> list[str]:
    """The URLs of a comma-separated list (one URL gives a list of one); ValueError when there is none."""
    urls = [u.strip(" ,") for u in _NEXT_URL.split(url.strip()) if u.strip(" ,")]
    if not urls:
        raise ValueError("no AMQP URL given: name one, or the nodes of a cluster separated by commas")
    return urls
