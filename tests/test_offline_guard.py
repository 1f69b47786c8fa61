import socket

import conftest
import pytest


def test_outbound_connection_is_refused_and_recorded():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(conftest.NetworkBlocked):
            sock.connect(("203.0.113.7", 443))  # TEST-NET-3, never routable
    finally:
        sock.close()
    assert conftest.NETWORK_ATTEMPTS == ["('203.0.113.7', 443)"]
    conftest.NETWORK_ATTEMPTS.clear()  # this attempt was the point of the test


def test_name_lookup_is_refused():
    with pytest.raises(conftest.NetworkBlocked):
        socket.getaddrinfo("huggingface.co", 443)
    assert conftest.NETWORK_ATTEMPTS == ["huggingface.co"]
    conftest.NETWORK_ATTEMPTS.clear()


def test_loopback_is_allowed():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.connect(server.getsockname())
        assert conftest.NETWORK_ATTEMPTS == []
    finally:
        client.close()
        server.close()


def test_hub_is_offline():
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE
