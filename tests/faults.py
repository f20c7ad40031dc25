"""Real faults for tests: a Redis server of the test's own, and a TCP proxy that can refuse, cut or hang.

Nothing here touches the shared services (PostgreSQL 5432, Redis 6379, RabbitMQ 5672) beyond connecting to them:
``RedisServer`` runs its own ``redis-server`` process on a free loopback port, and ``TcpProxy`` sits in front of a
shared service so a test can make it look down or hung to the code under test while the service itself runs on.

    with RedisServer(appendonly=True) as redis:    # redis.url -> redis://127.0.0.1:PORT/0
        redis.pause()                               # SIGSTOP: accepts connections, answers nothing (hung)
        redis.resume()
        redis.stop(); redis.start()                 # down, then back on the same port with its data (AOF)

    with TcpProxy("127.0.0.1", 5432) as proxy:      # point DATABASE_URL at 127.0.0.1:proxy.port
        proxy.refuse()                              # down: live connections closed, new ones refused
        proxy.hang()                                # hung: connections accepted, nothing forwarded
        proxy.cut()                                 # every live connection closed, new ones welcome
        proxy.heal()
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from types import TracebackType

import redis

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port of the loopback interface that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def wait_until(predicate: object, timeout: float, what: str) -> None:
    """Poll ``predicate()`` until it is true; ``TimeoutError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if predicate():  # type: ignore[operator]
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout} s")
        time.sleep(0.02)


def breaker_cache(url: str, *, timeout: float, cooldown: float) -> dict[str, dict[str, object]]:
    """``CACHES`` with a django-redis cache at ``url`` as the example project configures it: socket timeouts and the
    process's circuit breaker (``metering.breaker``)."""
    return {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": url,
            "OPTIONS": {
                "SOCKET_CONNECT_TIMEOUT": timeout,
                "SOCKET_TIMEOUT": timeout,
                "CONNECTION_POOL_CLASS": "metering.breaker.BreakerConnectionPool",
                "CONNECTION_POOL_KWARGS": {"breaker_cooldown": cooldown},
            },
        }
    }


_LIVE_PROCESSES: weakref.WeakSet[RedisServer] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    # A test that dies before its `with` block ends must not leave a redis-server behind.
    for server in list(_LIVE_PROCESSES):
        server.kill()


class RedisServer:
    """A ``redis-server`` process of its own on a free loopback port and a temporary directory.

    ``appendonly=True`` keeps the data across ``stop()``/``start()`` (the AOF is flushed on shutdown), as a real
    restart would; without it a restart comes back empty. No RDB snapshots are written (``--save ""``).
    """

    def __init__(self, appendonly: bool = False, binary: str = "redis-server") -> None:
        self.appendonly = appendonly
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="xaas-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain redis-py client of this server (not through any breaker), 1 s timeouts unless given."""
        options: dict[str, object] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0, **kwargs}
        return redis.Redis(host=LOOPBACK, port=self.port, **options)  # type: ignore[arg-type]

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (or start again, on the same port and directory) and wait until it answers PING."""
        if self.running:
            return self
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always" if self.appendonly else "no",
            "--daemonize", "no",
            "--logfile", os.path.join(self.dir, "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.paused = False
        _LIVE_PROCESSES.add(self)
        client = self.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            wait_until(lambda: self._alive() and client.ping(), timeout, f"redis-server on port {self.port}")
        finally:
            client.close()
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _alive(self) -> bool:
        if not self.running:
            raise RuntimeError(f"redis-server exited: {self._log_tail()}")
        return True

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "redis.log")) as log:
            return log.read()[-2000:]
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly: the AOF (when on) is flushed, so ``start()`` brings the data back."""
        if not self.running:
            return
        if self.paused:
            self.resume()
        client = self.client()
        try:
            client.shutdown(nosave=True)  # NOSAVE concerns RDB snapshots only; the AOF is still flushed
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        finally:
            client.close()
        assert self.process is not None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash would (and at exit): nothing is flushed."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, the server answers nothing (a hung Redis)."""
        assert self.process is not None and self.running
        os.kill(self.process.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT: answers again, including what was sent while it was paused."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
        self.paused = False

    def flushall(self) -> None:
        """Lose every key, as a flush (or a restart without persistence) would."""
        client = self.client()
        try:
            client.flushall()
        finally:
            client.close()

    def close(self) -> None:
        """Kill the process and remove its directory."""
        if self.paused and self.running:
            self.resume()
        self.kill()
        _LIVE_PROCESSES.discard(self)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class TcpProxy:
    """A threaded TCP proxy from a free loopback port to ``target_host:target_port``, with faults on demand.

    - ``refuse()``: the server is down: live connections are closed and new ones are refused (nothing listens).
    - ``cut()``: every live connection is closed; new ones are forwarded again (a network blip, a restart).
    - ``hang()``: connections are accepted (live and new) but no byte is forwarded until ``heal()`` (a hung server);
      what was sent meanwhile is delivered after ``heal()``.
    - ``heal()``: forward normally again (listening again on the same port after ``refuse()``).
    """

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._flowing = threading.Event()
        self._flowing.set()
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._stop_accepting = threading.Event()
        self.connections = 0  # accepted so far, for tests that count pool behaviour

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def start(self) -> TcpProxy:
        """Listen (again) on ``self.port``."""
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(self.address)
        listener.listen(128)
        listener.settimeout(0.05)  # the accept loop notices refuse()/close() within this
        self._listener = listener
        self._stop_accepting = threading.Event()
        self._accepting = threading.Thread(
            target=self._accept_loop, args=(listener, self._stop_accepting), name=f"proxy-{self.port}", daemon=True
        )
        self._accepting.start()
        return self

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            self.connections += 1
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the target itself is down: the client sees its connection closed
                continue
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink, pair), daemon=True).start()
        listener.close()

    def _pump(self, source: socket.socket, sink: socket.socket, pair: tuple[socket.socket, socket.socket]) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # hung: hold the bytes until heal()
                with self._lock:
                    if pair not in self._pairs:
                        break  # cut while held
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._close_pair(pair)

    def _close_pair(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            self._pairs.discard(pair)
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    @property
    def live(self) -> int:
        """Connections open through the proxy right now."""
        with self._lock:
            return len(self._pairs)

    def cut(self) -> None:
        """Close every live connection (both ends)."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._close_pair(pair)

    def refuse(self) -> None:
        """Down: stop listening (new connections are refused) and close the live ones."""
        self._stop_listening()
        self.cut()

    def hang(self) -> None:
        """Hung: accept, forward nothing (live connections included) until ``heal()``."""
        self.start()
        self._flowing.clear()

    def heal(self) -> None:
        """Forward normally again."""
        self.start()
        self._flowing.set()

    def _stop_listening(self) -> None:
        if self._listener is None:
            return
        self._stop_accepting.set()
        if self._accepting is not None:
            self._accepting.join(5)
        self._listener = None
        self._accepting = None

    def close(self) -> None:
        """Stop listening, close every connection, release held bytes' threads."""
        self._stop_listening()
        self.cut()
        self._flowing.set()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
