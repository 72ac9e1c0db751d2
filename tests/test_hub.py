"""The hub probe: one connection attempt per process, to the hub's host or its proxy, never here."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from huggingface_hub import constants

from adaptalign.common import hub

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")


class Connections:
    """Stands in for ``socket.create_connection``: records each attempt, answers as told."""

    def __init__(self, reachable: bool) -> None:
        self.reachable = reachable
        self.calls: list[tuple[tuple[str, int], float]] = []

    def __call__(self, address: tuple[str, int], timeout: float) -> socket.socket:
        self.calls.append((address, timeout))
        if not self.reachable:
            raise TimeoutError("timed out")
        return socket.socket()  # unconnected; the probe only closes it


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No offline variable, no proxy, a known endpoint and a fresh probe cache."""
    for variable in (*hub.OFFLINE_VARIABLES, *PROXY_VARIABLES, "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://models.example:8443")
    hub._probe.cache_clear()
    yield
    hub._probe.cache_clear()


def test_unreachable_hub_is_probed_once_with_a_short_timeout(
    online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect = Connections(reachable=False)
    monkeypatch.setattr(socket, "create_connection", connect)
    first = hub.hub_unreachable()
    assert first == "no connection to models.example:8443 within 2 s: timed out"
    assert hub.hub_unreachable() == first  # remembered: no second attempt
    assert connect.calls == [(("models.example", 8443), 2.0)]


def test_reachable_hub(online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    connect = Connections(reachable=True)
    monkeypatch.setattr(socket, "create_connection", connect)
    assert hub.hub_unreachable() is None
    monkeypatch.setattr(constants, "ENDPOINT", "http://mirror.example")
    assert hub.hub_unreachable() is None
    assert [address for address, _ in connect.calls] == [
        ("models.example", 8443),
        ("mirror.example", 80),  # the default port of the scheme
    ]


@pytest.mark.parametrize("variable", hub.OFFLINE_VARIABLES)
def test_offline_variable_skips_the_probe(
    online: None, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    connect = Connections(reachable=True)
    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setenv(variable, "1")
    assert hub.hub_unreachable() == f"{variable} is set"
    monkeypatch.setenv(variable, "0")
    assert hub.hub_unreachable() is None
    assert len(connect.calls) == 1  # only the second call probed


def test_proxy_is_probed_instead_of_the_hub(online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    connect = Connections(reachable=True)
    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert hub.hub_unreachable() is None
    monkeypatch.setenv("no_proxy", "models.example")
    hub._probe.cache_clear()
    assert hub.hub_unreachable() is None
    assert [address for address, _ in connect.calls] == [
        ("proxy.example", 3128),
        ("models.example", 8443),  # no_proxy names the hub: straight there
    ]
