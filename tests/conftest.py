"""Test-wide guards: the whole suite runs offline, and any attempt to reach the network fails the test.

Attempts are recorded as well as refused, because code under test may catch the refusal (a broad
`except`) and carry on; the autouse fixture then fails the test anyway.
"""

from __future__ import annotations

import ipaddress
import os
import socket

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest  # noqa: E402

NETWORK_ATTEMPTS: list[str] = []
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


class NetworkBlocked(OSError):
    pass


def _is_local(host: object) -> bool:
    if host in ("localhost", "", None) or str(host).startswith("/"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _check(target: object) -> None:
    host = target[0] if isinstance(target, tuple) else target
    if not _is_local(host):
        NETWORK_ATTEMPTS.append(str(target))
        raise NetworkBlocked(f"tests are offline: connection to {target!r} refused")


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check(address)
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    _check(host.decode() if isinstance(host, bytes) else host)
    return _real_getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.getaddrinfo = _guarded_getaddrinfo


@pytest.fixture(autouse=True)
def no_network_attempts():
    NETWORK_ATTEMPTS.clear()
    yield
    attempts = list(NETWORK_ATTEMPTS)
    NETWORK_ATTEMPTS.clear()
    assert not attempts, f"the code under test tried to reach the network: {attempts}"


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict:
    """Saved tiny diffusers folders for every family, built once per session."""
    from tiny_models import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny_pipeline(family, root / family) for family in ("sd1", "sd2", "sd2-v", "sdxl")}


@pytest.fixture(scope="session")
def bench_script():
    """Load a script of bench/ as a module (they are scripts run by path, not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
