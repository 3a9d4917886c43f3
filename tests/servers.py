"""Real processes the integration tests drive: ``python -m service`` and ``redis-server``.

``SegserveServer`` starts the server as the container does, on a free loopback port;
``RedisProcess`` a throwaway, restartable redis-server.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SegserveServer:
    """Starts ``python -m service --host 127.0.0.1 --port P`` with ``SEGSERVE_*`` settings."""

    def __init__(self, repository: Path, log_path: Path, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEGSERVE_")}
        env.update(
            {
                "SEGSERVE_MODEL_REPOSITORY": str(repository),
                "SEGSERVE_PROVIDERS": "cpu",
                "SEGSERVE_INTRA_OP_THREADS": "1",
                "SEGSERVE_WORKER_THREADS": "2",
            }
        )
        env.update({f"SEGSERVE_{k.upper()}": str(v) for k, v in settings.items()})
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """The first server of a fresh clone compiles the Numba kernels into their cache before
        it is ready: about 60 s on an idle 2-vCPU VM, past 90 s on a loaded one (a CI failure).
        The image ships them compiled (``seed_numba_cache``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log()}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait for the exit status (killed after ``timeout_s``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self._log.close()


def start_server(
    repository: Path, tmp_dir: Path, name: str = "server", **settings: object
) -> Iterator[SegserveServer]:
    """Generator body for module-scoped fixtures: start, wait for ready, yield, SIGTERM."""
    server = SegserveServer(repository, tmp_dir / f"{name}.log", **settings)
    try:
        server.wait_ready()
        yield server
    finally:
        server.terminate()


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisProcess:
    """A throwaway redis-server on a loopback port, restartable on the same port; with
    ``password``, protected by ``requirepass`` as deployed."""

    def __init__(self, workdir: Path, *extra: str, password: str | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.extra = extra
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir), *self.extra]
        if self.password is not None:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password)


@dataclass(frozen=True)
class TcpSocket:
    """One row of /proc/net/tcp or tcp6."""

    address: str  # local
    port: int  # local
    remote_port: int
    listening: bool
    inode: int


def tcp_sockets() -> list[TcpSocket]:
    """This machine's TCP sockets, as the kernel lists them."""
    sockets = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            (address, port), remote_port = fields[1].split(":"), fields[2].rsplit(":", 1)[1]
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            sockets.append(
                TcpSocket(
                    str(ipaddress.ip_address(words)),
                    int(port, 16),
                    int(remote_port, 16),
                    fields[3] == "0A",  # LISTEN
                    int(fields[9]),
                )
            )
    return sockets
