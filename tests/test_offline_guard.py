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


def test_the_package_itself_puts_the_hub_offline():
    """In a fresh process whose environment has no HF_HUB_OFFLINE (the conftest sets it for the tests, so
    checking it here could not fail): importing lora_studio alone must put huggingface_hub offline, and a
    user's explicit setting is left as it is."""
    import os
    import subprocess
    import sys

    code = "import lora_studio, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert fresh.stdout.strip() == "True", fresh.stderr[-2000:]
    without = subprocess.run([sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"],
                             capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert without.stdout.strip() == "False"  # so the line above is the package's doing
