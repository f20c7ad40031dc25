"""A real ClickHouse server for the tests: its own config, data directory and free loopback ports (never the
system service), started once per session and stopped afterwards."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

import httpx

from tests.faults import free_port

USER = "metering"
PASSWORD = "ch-secret-pass-0123456789"

CONFIG = """<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{root}/log/server.log</log>
        <errorlog>{root}/log/error.log</errorlog>
        <console>0</console>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <interserver_http_port>{interserver_port}</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <max_connections>256</max_connections>
    <keep_alive_timeout>30</keep_alive_timeout>
    <max_concurrent_queries>64</max_concurrent_queries>
    <uncompressed_cache_size>8589934592</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>{root}/data/</path>
    <tmp_path>{root}/tmp/</tmp_path>
    <user_files_path>{root}/user_files/</user_files_path>
    <format_schema_path>{root}/format_schemas/</format_schema_path>
    <users_config>{root}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
</yandex>
"""

USERS = """<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
        <{user}>
            <password>{password}</password>
            <networks><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </{user}>
    </users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
        <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default>
    </quotas>
</yandex>
"""


def binary() -> str | None:
    return shutil.which("clickhouse-server") or shutil.which("clickhouse")


class ClickHouseServer:
    """``clickhouse-server`` on free loopback ports with a temporary config and data directory."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="metering-clickhouse-"))
        self.http_port = free_port()
        self.tcp_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> ClickHouseServer:
        path = binary()
        if path is None:
            raise RuntimeError("clickhouse-server is not installed")
        for sub in ("log", "data", "tmp", "user_files", "format_schemas"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        config = self.root / "config.xml"
        config.write_text(
            CONFIG.format(
                root=self.root, http_port=self.http_port, tcp_port=self.tcp_port, interserver_port=free_port()
            )
        )
        (self.root / "users.xml").write_text(USERS.format(user=USER, password=PASSWORD))
        command = [path] if path.endswith("clickhouse-server") else [path, "server"]
        self.process = subprocess.Popen(
            [*command, f"--config-file={config}"],
            cwd=self.root,
            stdout=subprocess.DEVNULL,
            stderr=(self.root / "log" / "stderr.log").open("wb"),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"clickhouse-server exited ({self.process.returncode}): {self.log_tail()}")
            try:
                if httpx.get(self.url + "/ping", timeout=1).text.strip() == "Ok.":
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"clickhouse-server did not answer within {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        texts = []
        for name in ("stderr.log", "error.log"):
            log = self.root / "log" / name
            if log.exists():
                texts.append(log.read_text(errors="replace")[-2000:])
        return "\n".join(texts)

    def query(self, sql: str, *, user: str = "default", password: str = "") -> str:
        """Run ``sql`` as ``user``; raises ``RuntimeError`` with ClickHouse's message on an error."""
        response = httpx.post(
            self.url + "/",
            content=sql.encode(),
            headers={"X-ClickHouse-User": user, "X-ClickHouse-Key": password},
            timeout=30,
        )
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text[:500]}")
        return response.text

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ClickHouseServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class FaultyProxy:
    """An HTTP proxy in front of ClickHouse that forwards each request, then answers as ``faults`` says (one entry
    per request, then plain forwarding): ``"drop"`` closes the connection without an answer after ClickHouse
    stored the insert, ``"502"`` answers 502 after it stored it, ``"503-before"`` answers 503 without forwarding,
    ``"hold"`` forwards, sets ``held`` and keeps the answer until ``release()`` (a worker can be killed meanwhile)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[str] = []
        self.forwarded = 0
        self.lock = threading.Lock()
        self.held = threading.Event()
        self._released = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    fault = proxy.faults.pop(0) if proxy.faults else ""
                if fault == "503-before":
                    self._answer(503, b"Code: 999, e.displayText() = injected before forwarding")
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower().startswith("x-clickhouse")}
                response = httpx.post(proxy.upstream + self.path, content=body, headers=headers, timeout=30)
                with proxy.lock:
                    proxy.forwarded += 1
                if fault == "hold":
                    proxy.held.set()
                    proxy._released.wait(120)
                    self._answer(502, b"Bad Gateway (held, then released)")
                    return
                if fault == "drop":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "502":
                    self._answer(502, b"Bad Gateway (injected after the insert)")
                    return
                self._answer(response.status_code, response.content)

            def _answer(self, status: int, body: bytes) -> None:
                with contextlib.suppress(OSError):  # the client may be gone (killed, timed out)
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def release(self) -> None:
        self._released.set()

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
