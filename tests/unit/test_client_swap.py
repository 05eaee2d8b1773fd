"""AgentAPI.replace_client: new requests use the new client; the old one closes when its last request ends."""

from __future__ import annotations

import threading

import httpx

from edge_agent.client import AgentAPI

WAIT = 60.0


def test_old_client_stays_open_for_its_request_in_flight() -> None:
    release, arrived = threading.Event(), threading.Event()

    def old_handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/execution/slow":
            arrived.set()
            release.wait(WAIT)
        return httpx.Response(200, json={"via": "old"})

    old = httpx.Client(base_url="https://gw.test", transport=httpx.MockTransport(old_handler))
    new = httpx.Client(base_url="https://gw.test",
                       transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"via": "new"})))
    api = AgentAPI(old)
    result: dict = {}
    t = threading.Thread(
        target=lambda: result.setdefault("r", api.execution_request("GET", "/execution/slow", {}, b"")))
    t.start()
    assert arrived.wait(WAIT)
    api.replace_client(new)
    assert not old.is_closed  # its request is still running
    assert api.execution_request("GET", "/execution/x", {}, b"")[2] == b'{"via":"new"}'
    release.set()
    t.join(WAIT)
    assert result["r"][0] == 200 and result["r"][2] == b'{"via":"old"}'
    assert old.is_closed and not new.is_closed
    api.close()
    assert new.is_closed


def test_an_idle_client_is_closed_at_once() -> None:
    old = httpx.Client(base_url="https://gw.test", transport=httpx.MockTransport(lambda r: httpx.Response(204)))
    api = AgentAPI(old)
    api.replace_client(httpx.Client(base_url="https://gw.test"))
    assert old.is_closed
    api.close()
