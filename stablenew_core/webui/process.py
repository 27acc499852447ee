"""SimulatorProcess: the WebUI simulator as a child process on a free 127.0.0.1 port.

Owns starting ``python -m stablenew_core.webui.simulator`` (credentials passed through the
environment, never the command line), waiting until it answers, the ``/sim/*`` control calls
(stats, faults, reset, step time) and stopping it (terminate, then kill after a timeout).
Used by tests, benchmarks and ``stablenew webui-sim``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

_START_ATTEMPTS = 3


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class SimulatorProcess:
    """A simulator child process; a context manager (``with SimulatorProcess() as sim:``)."""

    def __init__(
        self,
        *,
        step_seconds: float = 0.01,
        auth: tuple[str, str] | None = None,
        faults: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int | None = None,
        seed: int | None = None,
        startup_timeout: float = 30.0,
        log_path: Path | None = None,
    ) -> None:
        self.step_seconds = step_seconds
        self.host = host
        self.port = port
        self.seed = seed
        self.faults = list(faults)
        self.startup_timeout = startup_timeout
        self._auth = auth
        self._log_path = log_path
        self._log_file: IO[bytes] | None = None
        self._owns_log = log_path is None
        self._process: subprocess.Popen[bytes] | None = None
        self._http: httpx.Client | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"SimulatorProcess({self.url if self.port else 'unstarted'}, {state})"

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321``."""
        if self.port is None:
            raise RuntimeError("the simulator has not been started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def log_path(self) -> Path | None:
        """Where the child's stdout and stderr go."""
        return self._log_path

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> SimulatorProcess:
        """Start the child and wait until it answers; raises RuntimeError if it does not."""
        if self.running:
            return self
        fixed_port = self.port is not None
        last_error = ""
        for _attempt in range(1 if fixed_port else _START_ATTEMPTS):
            if not fixed_port:
                self.port = free_port(self.host)
            self._spawn()
            error = self._wait_ready()
            if error is None:
                return self
            last_error = error
            self._terminate()
        raise RuntimeError(f"the WebUI simulator did not start: {last_error}")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the child, kill it if it has not exited after ``timeout`` seconds."""
        if self._http is not None:
            self._http.close()
            self._http = None
        self._terminate(timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._owns_log and self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        """What the child has written so far (for diagnostics)."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(encoding="utf-8", errors="replace")

    def _spawn(self) -> None:
        command = [
            sys.executable,
            "-m",
            "stablenew_core.webui.simulator",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--step-seconds",
            repr(float(self.step_seconds)),
        ]
        if self.seed is not None:
            command += ["--seed", str(self.seed)]
        for fault in self.faults:
            command += ["--fault", fault]
        env = dict(os.environ)
        # The child imports this very package, wherever the parent runs from.
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
        env.pop("STABLENEW_SIM_AUTH", None)
        if self._auth is not None:
            env["STABLENEW_SIM_AUTH"] = f"{self._auth[0]}:{self._auth[1]}"
        if self._log_file is None:
            if self._log_path is None:
                handle, name = tempfile.mkstemp(prefix="stablenew-webui-sim-", suffix=".log")
                os.close(handle)
                self._log_path = Path(name)
            self._log_file = self._log_path.open("ab")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def _wait_ready(self) -> str | None:
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(auth=self._basic_auth(), timeout=2.0) as client:
            while time.monotonic() < deadline:
                assert self._process is not None
                code = self._process.poll()
                if code is not None:
                    return f"it exited with code {code}: {self.log_text()[-2000:]}"
                try:
                    if client.get(f"{self.url}/sim/config").status_code == 200:
                        return None
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        return f"no answer within {self.startup_timeout:g}s: {self.log_text()[-2000:]}"

    def _terminate(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)

    # -- control ------------------------------------------------------------------------------

    def _basic_auth(self) -> httpx.BasicAuth | None:
        return httpx.BasicAuth(*self._auth) if self._auth else None

    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(base_url=self.url, auth=self._basic_auth(), timeout=10.0)
        return self._http

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        response = self._client().request(method, path, json=body)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        """GET /sim/stats: every generation with timings, outcome and unknown fields."""
        data = self._call("GET", "/sim/stats")
        assert isinstance(data, dict)
        return data

    def inject(self, kind: str, count: int = 1, routes: Sequence[str] | None = None) -> None:
        """Make the next ``count`` generation requests (on ``routes``) fail as ``kind``."""
        body: dict[str, Any] = {"kind": kind, "count": count}
        if routes is not None:
            body["routes"] = list(routes)
        self._call("POST", "/sim/faults", body)

    def clear_faults(self) -> None:
        """Drop every pending fault."""
        self._call("DELETE", "/sim/faults")

    def reset(self) -> None:
        """Clear the statistics."""
        self._call("POST", "/sim/reset")

    def set_step_seconds(self, seconds: float) -> None:
        """Change the time per sampling step."""
        self._call("POST", "/sim/config", {"step_seconds": seconds})
        self.step_seconds = seconds
