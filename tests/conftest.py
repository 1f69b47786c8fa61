"""Test-wide guards: the whole suite runs offline, and any attempt to reach the network fails the test.

Attempts are recorded as well as refused, because code under test may catch the refusal (a broad
`except`) and carry on; the autouse fixture then fails the test anyway.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

# The suite runs in worker processes side by side (pytest-xdist, `-n 2` in pyproject's addopts). Each gets its share
# of the cores, set before torch is imported (OMP_NUM_THREADS reaches the apps and CLIs the tests start too): two
# workers each splitting every op over all the cores run 4-10x slower than one worker alone. Only in a worker: the
# controller loads this file too, and the workers inherit its environment.
TEST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
TEST_THREADS = max(1, (os.cpu_count() or 1) // TEST_WORKERS)
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)

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


@pytest.fixture(autouse=True)
def fixed_cpu_threads(monkeypatch):
    """Trainings in tests run at a fixed thread count, this worker's share of the cores. The default policy
    (cpu_threads.ThreadTuner) picks the count from step times, and 1 and 2 threads give results that differ by
    ~1e-7, so tests that compare weights bit for bit (resume, several processes) would depend on the machine's
    load. The tuner has tests of its own (test_cpu_threads.py) that set this back."""
    monkeypatch.setenv("LORA_STUDIO_CPU_THREADS", str(TEST_THREADS))


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
        sys.modules[spec.name] = module  # dataclasses look their module up there while the script runs
        spec.loader.exec_module(module)
        return module

    return load


class SmallDisk:
    """A folder on a small tmpfs that `fill()` makes full, so writes there fail with ENOSPC for real.

    Where the machine does not let a test mount a tmpfs (no root), the folder is an ordinary one and,
    once filled, `fsutil`'s flush of any file in it raises ENOSPC: the error a full disk gives at that
    call on filesystems that defer allocation."""

    def __init__(self, folder, mounted: bool, monkeypatch):
        self.folder, self.mounted, self._full = folder, mounted, False
        if not mounted:
            from lora_studio import fsutil

            flush = fsutil._fsync

            def full_disk_fsync(path):
                if self._full and str(path).startswith(str(folder)):
                    raise OSError(28, "No space left on device")
                flush(path)

            monkeypatch.setattr(fsutil, "_fsync", full_disk_fsync)

    def fill(self) -> None:
        self._full = True
        if self.mounted:
            import errno

            with open(self.folder / ".ballast", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
            try:  # the last partial blocks too
                with open(self.folder / ".ballast2", "wb") as f:
                    while True:
                        f.write(b"\0" * 512)
                        f.flush()
            except OSError:
                pass

    def free(self) -> None:
        self._full = False
        for name in (".ballast", ".ballast2"):
            (self.folder / name).unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    import subprocess

    folder = tmp_path / "small-disk"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)]
    mounted = subprocess.run(mount, capture_output=True).returncode == 0
    yield SmallDisk(folder, mounted, monkeypatch)
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def app_state(tmp_path, monkeypatch):
    """The app's server-side state over a fresh home (runs/, datasets/, models/ in a temp folder), with Gradio's
    upload folder in the temp folder too (handlers accept uploads only from there)."""
    from lora_studio.paths import Roots
    from lora_studio.ui.state import AppState

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORA_STUDIO_HOME", str(home))
    monkeypatch.delenv("LORA_STUDIO_MODELS", raising=False)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-uploads"))
    (tmp_path / "gradio-uploads").mkdir()
    return AppState(Roots.default())
