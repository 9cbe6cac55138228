"""Fault injection for tests: a TCP proxy that can refuse and cut connections, a private Redis that can stop and hang.

Both are owned by the test that starts them, so faults never touch the machine's shared
PostgreSQL or Redis: the service is pointed at the proxy (in front of PostgreSQL) or at the
private redis-server, and the test breaks those.
"""

import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading

import redis

from tests.helpers import free_port, wait_until

BUFFER = 65536


class _Link:
    """One proxied connection: the client's socket and the upstream socket, piped both ways."""

    def __init__(self, client, upstream, on_closed, flowing):
        """Pair two connected sockets; bytes pass only while `flowing` is set; `on_closed(link)` runs at the end."""
        self.client, self.upstream = client, upstream
        self.flowing = flowing
        self.closed = False
        self._on_closed = on_closed
        self._pipes_left = 2
        self._mutex = threading.Lock()

    def start(self):
        """Start piping in both directions, one thread each."""
        for source, sink in ((self.client, self.upstream), (self.upstream, self.client)):
            threading.Thread(target=self._pipe, args=(source, sink), daemon=True, name="tcp-proxy-pipe").start()

    def _pipe(self, source, sink):
        """Copy bytes from source to sink until either end closes; then end the whole link."""
        try:
            while data := source.recv(BUFFER):
                while not self.flowing.wait(0.05):
                    if self.closed:
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self.shutdown()
            self._pipe_ended()

    def shutdown(self):
        """End both connections abruptly: both directions of both sockets (wakes the pipes)."""
        self.closed = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _pipe_ended(self):
        """Close the sockets once neither pipe uses them any more."""
        with self._mutex:
            self._pipes_left -= 1
            last = self._pipes_left == 0
        if last:
            self.client.close()
            self.upstream.close()
            self._on_closed(self)


class TcpProxy:
    """A loopback TCP proxy to one target that can refuse new connections and cut current ones."""

    def __init__(self, target_host, target_port):
        """Configure, not yet listening."""
        self.target = (target_host, target_port)
        self.port = None
        self.connections_accepted = 0
        self._links = set()
        self._mutex = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._listener = None
        self._wake = None
        self._thread = None

    @property
    def url_port(self):
        """The port clients connect to (the same across refuse() and accept())."""
        return self.port

    @property
    def open_connections(self):
        """How many proxied connections are open right now."""
        with self._mutex:
            return len(self._links)

    def start(self):
        """Listen on a free loopback port and start forwarding."""
        self.accept()
        return self

    def accept(self):
        """Listen (again) on the proxy's port, so new connections are forwarded."""
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port or 0))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, args=(listener, self._wake[0]), daemon=True,
                                        name="tcp-proxy-accept")
        self._thread.start()

    def _serve(self, listener, wake):
        """Accept connections until refuse() rings the wake socket."""
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if wake in ready:
                    return
                try:
                    client, _ = listener.accept()
                except OSError:
                    continue
                self._forward(client)

    def _forward(self, client):
        """Connect the accepted client to the target; drop it if the target cannot be reached."""
        try:
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        link = _Link(client, upstream, self._forget, self._flowing)
        with self._mutex:
            self.connections_accepted += 1
            self._links.add(link)
        link.start()

    def _forget(self, link):
        """Drop a link whose connections have both closed."""
        with self._mutex:
            self._links.discard(link)

    def refuse(self):
        """Stop listening: new connections are refused, the current ones go on."""
        if self._listener is None:
            return
        self._wake[1].send(b"!")
        self._thread.join(5)
        self._listener.close()
        for end in self._wake:
            end.close()
        self._listener = self._wake = self._thread = None

    def stall(self):
        """Hold every byte in both directions: connections open and stay open, but nothing ever answers."""
        self._flowing.clear()

    def flow(self):
        """Pass bytes again, the held ones first."""
        self._flowing.set()

    def cut(self):
        """Abruptly end every current connection, both sides, as a crashed server or network would."""
        with self._mutex:
            links = list(self._links)
        for link in links:
            link.shutdown()
        wait_until(lambda: self.open_connections == 0, timeout=5, interval=0.01)

    def stop(self):
        """Refuse new connections, cut the current ones and let any held bytes go (to nowhere)."""
        self.refuse()
        self.flow()
        self.cut()


class RedisServer:
    """A private redis-server on a free loopback port that tests may stop, restart, pause and resume.

    With `tls` (a certificate file and its key file) it speaks TLS only, as managed Redis does;
    with `password` it asks for one.
    """

    def __init__(self, tls=None, password=None):
        """Pick a port and a data directory, not yet started."""
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="faults-redis-")
        self.tls, self.password = tls, password
        self.process = None
        self.paused = False

    @property
    def url(self):
        """The URL of database 0 of this server (rediss:// and the password in it, if it has them)."""
        scheme = "rediss" if self.tls else "redis"
        credentials = f":{self.password}@" if self.password else ""
        return f"{scheme}://{credentials}127.0.0.1:{self.port}/0"

    def start(self):
        """Start redis-server (on the same port as before, if restarted) and wait until it answers PING."""
        ports = ["--port", str(self.port)]
        if self.tls:
            certificate, key = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(certificate),
                     "--tls-key-file", str(key), "--tls-auth-clients", "no"]
        if self.password:
            ports += ["--requirepass", self.password]
        command = [shutil.which("redis-server") or "redis-server", *ports, "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", self.dir]
        log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.paused = False
        if not wait_until(self._answers, timeout=10):
            self.stop()
            raise RuntimeError(f"redis-server did not start on port {self.port}")
        return self

    def _answers(self):
        """True once the server answers PING; raise if it exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        try:
            with self.client(timeout=0.5) as client:
                return client.ping()
        except redis.RedisError:
            return False

    def stop(self):
        """Stop the server (SIGTERM) and wait until it has exited."""
        if self.process is None or self.process.poll() is not None:
            return
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def pause(self):
        """Freeze the server (SIGSTOP): it still accepts TCP connections but never answers."""
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self):
        """Let a paused server run again (SIGCONT)."""
        if self.paused:
            self.process.send_signal(signal.SIGCONT)
            self.paused = False

    def client(self, timeout=5):
        """A redis-py client of database 0, decoding replies to str (over TLS, without checking the certificate)."""
        tls = {"ssl": True, "ssl_cert_reqs": "none"} if self.tls else {}
        return redis.Redis(host="127.0.0.1", port=self.port, db=0, password=self.password, decode_responses=True,
                           socket_timeout=timeout, socket_connect_timeout=timeout, **tls)

    def close(self):
        """Stop the server and remove its data directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

