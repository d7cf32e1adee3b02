"""A real `mlflow server` for tests: sqlite backend store, artifacts proxied by the server into a local
folder, listening on 127.0.0.1 on a free port inside a temporary folder.

    with mlflow_server(tmp_path) as server:
        Tracker.open(TrackingConfig(tracking_uri=server.uri), ...)

`kill()` simulates a crash (SIGKILL) and `start()` brings the server back on the same port and
store; `pause()`/`resume()` simulate a hung server. A start takes ~10 s on 2 idle cores.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    def __init__(self, root: str | Path, port: int | None = None, startup_timeout_seconds: float = 120.0):
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.backend_store_uri = f"sqlite:///{(self.root / 'mlflow.db').as_posix()}"
        self.artifacts_dir = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        self.startup_timeout_seconds = startup_timeout_seconds
        self._proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MlflowServer:
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", str(self.artifacts_dir),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        # The job runner is an extra always-on process that tracking does not use.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.log_path, "ab") as log_file:
            # Own session: the server forks a uvicorn worker, and stop()/kill() must reach both.
            self._proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_seconds
        while not self._healthy():
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mlflow server not healthy after {self.startup_timeout_seconds:.0f} s:\n"
                                   f"{self._log_tail()}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM to the server's process group), SIGKILL after 10 s."""
        self._signal(signal.SIGTERM, wait_seconds=10.0)

    def kill(self) -> None:
        """Crash the server: SIGKILL to its process group, as an OOM killer or a node failure would."""
        self._signal(signal.SIGKILL, wait_seconds=10.0)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted by the kernel but never answered."""
        os.killpg(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self._proc.pid, signal.SIGCONT)

    def _signal(self, sig: int, wait_seconds: float) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)
            try:
                self._proc.wait(timeout=wait_seconds)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        # The worker may outlive the parent for a moment: wait until the port is free again.
        deadline = time.monotonic() + wait_seconds
        while self._healthy() and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            time.sleep(0.1)
        self._proc = None

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else "(no log)"


@contextlib.contextmanager
def mlflow_server(root: str | Path, port: int | None = None) -> Iterator[MlflowServer]:
    """A started server for the `with` block; stopped afterwards even when the block fails."""
    server = MlflowServer(root, port).start()
    try:
        yield server
    finally:
        server.stop()
