"""Whether the model hub can be reached, decided once per process.

Without a network the hub client retries every file five times with growing pauses, so a text model
name that is neither a folder nor in the local cache took 95 s to fail on 2 cores, and timm's
``pretrained`` weights as long. One connection attempt to the hub's host (or to the proxy the
environment names for it) with a 2 s timeout decides instead; loaders then read only the local
hub cache and fail at once when the model is not there. ``HF_HUB_OFFLINE`` (or
``TRANSFORMERS_OFFLINE``) set to a true value skips the attempt.
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.request
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 2.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_unreachable() -> str | None:
    """Why the hub cannot be used, for an error message, or ``None`` when it answers."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().upper() in _TRUE:
            return f"{variable} is set"
    from huggingface_hub import constants

    return _probe(constants.ENDPOINT)


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


@functools.cache
def _probe(endpoint: str) -> str | None:
    """One TCP connect to the endpoint's host, or its proxy; remembered for the process."""
    url = urlsplit(endpoint)
    host, port = url.hostname or "", url.port or _default_port(url.scheme)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or "", proxy_url.port or _default_port(proxy_url.scheme)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"no connection to {host}:{port} within {PROBE_TIMEOUT_S:g} s: {exc}"
    return None
