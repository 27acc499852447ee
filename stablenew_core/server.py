"""The local Prefect server: start, stop and health of the one this project runs for the user.

The server binds ``settings.server_host`` (127.0.0.1 by default) on ``settings.server_port``,
keeps its database under ``STABLENEW_HOME`` (SQLite by default, PostgreSQL when
``settings.database_url`` is set), writes its log to ``<home>/logs/server.log`` and its pid to
``<home>/server.pid``. It runs detached, so ``stablenew run`` can start it once and later
commands reuse it; ``stablenew down`` stops it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ._proc import pid_alive
from .errors import ServerError
from .prefect_env import process_env
from .settings import Settings


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when a Prefect API answers its health check at ``api_url``."""
    try:
        response = httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


class LocalServer:
    """The Prefect server process this project starts on the user's machine."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.api_url = settings.local_api_url
        self.pid_file = settings.home / "server.pid"
        self.log_file = settings.home / "logs" / "server.log"
        self._process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """The server's environment: ours, plus Prefect's server settings."""
        s = self.settings
        env = process_env(s)
        env.pop("PREFECT_API_URL", None)
        env.pop("PREFECT_API_KEY", None)
        env.update(
            {
                "PREFECT_SERVER_API_HOST": s.server_host,
                "PREFECT_SERVER_API_PORT": str(s.server_port),
                "PREFECT_UI_API_URL": self.api_url,
                "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            }
        )
        if s.database_url is not None:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = s.database_url.get_secret_value()
        else:
            database = s.prefect_home / "prefect.db"
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{database}"
        return env

    def healthy(self) -> bool:
        """True when the server answers."""
        return api_healthy(self.api_url)

    def running_pid(self) -> int | None:
        """The pid in the pid file, if that process is alive and is a server of ours."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not pid_alive(pid):
            return None
        try:  # a stale pid file (after a reboot) may name an unrelated process
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return pid  # no /proc: trust the pid file
        return pid if b"stablenew_core._server_main" in command else None

    def start(self, *, detach: bool = True, wait: bool = True) -> None:
        """Start the server unless one already answers; wait until it is healthy."""
        if self.healthy():
            return
        s = self.settings
        for directory in (s.home, s.prefect_home, self.log_file.parent):
            directory.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "stablenew_core._server_main",
            "--host",
            s.server_host,
            "--port",
            str(s.server_port),
        ]
        log = self.log_file.open("ab")
        try:
            self._process = subprocess.Popen(
                command,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=detach,
                preexec_fn=_default_sigint,
            )
        finally:
            log.close()
        self.pid_file.write_text(str(self._process.pid))
        if wait:
            self.wait_healthy()

    def wait_healthy(self) -> None:
        """Block until the server answers, or raise :class:`ServerError` with its log's tail."""
        deadline = time.monotonic() + self.settings.server_start_timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if self._process is not None and self._process.poll() is not None:
                break
            time.sleep(0.25)
        raise ServerError(
            f"the Prefect server at {self.api_url} did not become healthy; "
            f"last lines of {self.log_file}:\n{_tail(self.log_file)}"
        )

    def stop(self, timeout: float = 15.0) -> bool:
        """Stop the server of this data directory (ours, or the one its pid file names)."""
        pids = {pid for pid in (self.running_pid(),) if pid is not None}
        if self._process is not None and self._process.poll() is None:
            pids.add(self._process.pid)
        for pid in pids:
            _terminate_group(pid, timeout)
        if self._process is not None:
            self._process.wait(timeout=5)
            self._process = None
        self.pid_file.unlink(missing_ok=True)
        return bool(pids)


def ensure_server(settings: Settings, *, start: bool = True) -> str:
    """The API URL to use; starts the local server first when it is ours and not running.

    With ``start=False`` (workers), a server that does not answer is an error instead.
    """
    url = settings.api_url()
    if api_healthy(url):
        return url
    if not start or not settings.uses_local_server():
        raise ServerError(
            f"the Prefect API at {url} does not answer; check PREFECT_API_URL / "
            "STABLENEW_PREFECT_API_URL, or unset them to use the local server"
        )
    LocalServer(settings).start()
    return url


def _default_sigint() -> None:
    # Background children of a non-interactive shell ignore SIGINT, which Prefect relies on.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _terminate_group(pid: int, timeout: float) -> None:
    try:
        pgid = os.getpgid(pid)
    except OSError:
        return
    target_group = pgid == pid
    _signal(pid, pgid, signal.SIGTERM, target_group)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        if _reap(pid):
            return
        time.sleep(0.1)
    _signal(pid, pgid, signal.SIGKILL, target_group)


def _signal(pid: int, pgid: int, sig: signal.Signals, group: bool) -> None:
    try:
        if group:
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except OSError:
        pass


def _reap(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
