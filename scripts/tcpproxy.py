"""A loopback TCP proxy that can cut its traffic like a network partition: ``TcpProxy``.

Used by the chaos suite to put one agent behind a link to its gateway that can fail and come back::

    with TcpProxy(gateway_port) as proxy:        # listens on 127.0.0.1:proxy.port
        ...agent talks to https://127.0.0.1:{proxy.port}...
        proxy.partition()                        # the link goes dark
        ...60 s later...
        proxy.heal()                             # and comes back

The proxy copies bytes and nothing else, so TLS (mutual, with our CA) runs through it end to end:
the gateway still sees the agent's client certificate, the agent still verifies the gateway's.

Why a blackhole and not a reset
-------------------------------
A partition in the field (a dead route, a firewall that starts dropping, a NAT or load balancer
that loses its state, a VPN that goes down) almost never tells either end anything: packets are
dropped, no RST or FIN arrives, and each side's TCP keeps its connection open and retransmits into
the void. The failure a program meets is therefore a *hang*: a write that blocks once the send
buffer is full, a read that never returns, a connect or TLS handshake that times out, and only its
own timeouts end it. A proxy that closed or reset connections would test the easy case (an
immediate, explicit error the agent's retry loop handles at once) and hide the hard one (an agent
stuck in a read with no timeout, a long-poll that never ends, a heartbeat thread blocked forever).
And when the route comes back, TCP's retransmissions deliver what was in flight: a connection that
waited out the partition simply continues, which is what :meth:`TcpProxy.heal` does too.

Semantics:

* :meth:`~TcpProxy.partition`: from the moment it returns no byte is forwarded in either direction.
  The proxy stops reading from every socket, so what a peer sends during the partition piles up in
  the kernel's buffers (then the sender's writes block), exactly as it would behind a dead route.
  New connections are accepted (the kernel completes the TCP handshake on a listening socket
  anyway) but not connected upstream: the client's TLS handshake hangs. Nothing is closed, and a
  peer that closes during the partition is only noticed after it.
* :meth:`~TcpProxy.heal`: held connections resume where they stopped (the bytes they sent during
  the partition arrive, in order), and connections accepted during it are connected upstream.
* :meth:`~TcpProxy.stop`: closes every socket and joins the thread. Idempotent.

One background thread runs a ``selectors`` loop that blocks until a socket is ready or a command
arrives over a socketpair: no polling, no timers. Buffers are bounded per direction, so a slow
reader applies back-pressure to the writer through TCP as a real link would.

By hand: ``python scripts/tcpproxy.py TARGET_PORT [--listen-port N]`` prints the port it listens
on; SIGUSR1 partitions, SIGUSR2 heals, SIGTERM or Ctrl-C stops.
"""

from __future__ import annotations

import argparse
import errno
import queue
import selectors
import signal
import socket
import sys
import threading
from types import TracebackType
from typing import Self

LISTEN_HOST = "127.0.0.1"
#: Most bytes held per direction of one connection before the proxy stops reading that side.
MAX_BUFFER = 256 * 1024
RECV_SIZE = 64 * 1024
#: How long partition()/heal()/stop() wait for the proxy thread to act (it never blocks, so this
#: only bounds a bug, it is not an expected duration).
COMMAND_TIMEOUT = 30.0


class TcpProxyError(RuntimeError):
    """Misuse of the proxy (start twice, a command before start) or a thread that did not answer."""


class _Conn:
    """One proxied connection: the accepted client socket, its upstream socket, and the bytes between."""

    __slots__ = (
        "client", "upstream", "connecting", "up", "down", "client_eof", "upstream_eof",
        "up_shut", "down_shut", "closed", "masks",
    )

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.connecting = False
        #: Read from the client, not yet written upstream; and the other way.
        self.up = bytearray()
        self.down = bytearray()
        #: A FIN was read from that side; it is passed on once the buffer towards the other side is empty.
        self.client_eof = False
        self.upstream_eof = False
        self.up_shut = False
        self.down_shut = False
        self.closed = False
        #: The selector interest currently registered per socket (absent: not registered).
        self.masks: dict[int, int] = {}


class TcpProxy:
    """Forward 127.0.0.1:``listen_port`` (0: a free port) to ``target_host``:``target_port``."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._listen_port = listen_port
        self.port: int = 0
        #: Connections accepted, bytes written to the target, bytes written back to clients.
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._partitioned = False
        self._listener: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._commands: queue.SimpleQueue[tuple[str, threading.Event]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conns: set[_Conn] = set()
        self._stopped = False

    # ---- public interface ----------------------------------------------------------------------

    @property
    def partitioned(self) -> bool:
        return self._partitioned

    @property
    def open_connections(self) -> int:
        """Client connections currently held open by the proxy."""
        return len(self._conns)

    def start(self) -> Self:
        if self._thread is not None or self._stopped:
            raise TcpProxyError("a TcpProxy can be started once")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((LISTEN_HOST, self._listen_port))
            listener.listen(128)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name=f"tcpproxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def partition(self) -> None:
        """Blackhole: no byte moves either way once this returns; nothing is closed."""
        self._command("partition")

    def heal(self) -> None:
        """End the partition: held connections continue, ones accepted meanwhile are connected upstream."""
        self._command("heal")

    def stop(self) -> None:
        """Close the listener and every connection; join the thread. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive():
            done = threading.Event()
            self._commands.put(("stop", done))
            self._wake()
            thread.join(COMMAND_TIMEOUT)
            if thread.is_alive():
                raise TcpProxyError(f"proxy thread on port {self.port} did not stop")
        self._close_all()

    def __enter__(self) -> Self:
        return self.start() if self._thread is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "partitioned" if self._partitioned else "forwarding"
        return f"TcpProxy(127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]}, {state})"

    # ---- commands (caller's thread) -------------------------------------------------------------

    def _command(self, name: str) -> None:
        thread = self._thread
        if thread is None or self._stopped or not thread.is_alive():
            raise TcpProxyError(f"{name}(): the proxy is not running (start() it first)")
        done = threading.Event()
        self._commands.put((name, done))
        self._wake()
        # Synchronous on purpose: after partition() returns the caller may assert that nothing
        # gets through, so the loop must have switched before we return.
        if not done.wait(COMMAND_TIMEOUT):
            raise TcpProxyError(f"proxy thread on port {self.port} did not acknowledge {name}()")

    def _wake(self) -> None:
        assert self._wake_w is not None
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full of wake-ups already, or the loop is gone: either way it is awake

    # ---- the loop (proxy thread) ----------------------------------------------------------------

    def _run(self) -> None:
        assert self._sel is not None
        try:
            while True:
                for key, mask in self._sel.select():
                    if key.data == "wake":
                        self._drain_wake()
                    elif key.data == "listen":
                        self._accept()
                    else:
                        conn, side = key.data
                        if not conn.closed:
                            self._service(conn, side, mask)
                if self._apply_commands():
                    return
        finally:
            self._close_all()

    def _apply_commands(self) -> bool:
        """Run queued commands between two rounds of I/O; True when told to stop."""
        while True:
            try:
                name, done = self._commands.get_nowait()
            except queue.Empty:
                return False
            if name == "stop":
                done.set()
                return True
            self._partitioned = name == "partition"
            for conn in list(self._conns):
                if not self._partitioned and conn.upstream is None:
                    self._connect_upstream(conn)
                if not conn.closed:
                    self._update(conn)
            done.set()

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: leave it in the backlog and try again on the next event.
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                raise
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections += 1
            conn = _Conn(client)
            self._conns.add(conn)
            if not self._partitioned:
                self._connect_upstream(conn)
            if not conn.closed:
                self._update(conn)

    def _connect_upstream(self, conn: _Conn) -> None:
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.upstream = upstream
        code = upstream.connect_ex(self.target)
        if code in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            conn.connecting = code != 0
        else:
            # The target refused: the client sees its connection end, as it would without the proxy.
            self._close(conn)

    def _service(self, conn: _Conn, side: str, mask: int) -> None:
        if self._partitioned:
            return  # a readiness reported in the same round as the partition command: ignore it
        try:
            if side == "upstream" and conn.connecting:
                assert conn.upstream is not None
                err = conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._close(conn)
                    return
                conn.connecting = False
            if side == "client":
                if mask & selectors.EVENT_READ:
                    self._read(conn, conn.client, conn.up, "client")
                if mask & selectors.EVENT_WRITE:
                    self.bytes_down += self._write(conn.client, conn.down)
            else:
                assert conn.upstream is not None
                if mask & selectors.EVENT_READ:
                    self._read(conn, conn.upstream, conn.down, "upstream")
                if mask & selectors.EVENT_WRITE and not conn.connecting:
                    self.bytes_up += self._write(conn.upstream, conn.up)
        except OSError:
            # ECONNRESET, EPIPE...: one side is gone; the other learns it by its socket closing.
            self._close(conn)
            return
        self._propagate_eof(conn)
        if not conn.closed:
            self._update(conn)

    @staticmethod
    def _read(conn: _Conn, sock: socket.socket, into: bytearray, side: str) -> None:
        try:
            data = sock.recv(min(RECV_SIZE, MAX_BUFFER - len(into)))
        except (BlockingIOError, InterruptedError):
            return
        if data:
            into += data
        elif side == "client":
            conn.client_eof = True
        else:
            conn.upstream_eof = True

    @staticmethod
    def _write(sock: socket.socket, buf: bytearray) -> int:
        try:
            sent = sock.send(buf)
        except (BlockingIOError, InterruptedError):
            return 0
        del buf[:sent]
        return sent

    def _propagate_eof(self, conn: _Conn) -> None:
        """Pass a half-close on once everything before it was delivered; close when both ends are done."""
        if conn.client_eof and not conn.up and not conn.up_shut and conn.upstream is not None and not conn.connecting:
            conn.up_shut = True
            _shutdown_write(conn.upstream)
        if conn.upstream_eof and not conn.down and not conn.down_shut:
            conn.down_shut = True
            _shutdown_write(conn.client)
        if conn.up_shut and conn.down_shut:
            self._close(conn)

    def _update(self, conn: _Conn) -> None:
        """Register exactly the interest each socket of ``conn`` needs now (none while partitioned)."""
        client_mask = upstream_mask = 0
        if not self._partitioned:
            if not conn.client_eof and len(conn.up) < MAX_BUFFER:
                client_mask |= selectors.EVENT_READ
            if conn.down:
                client_mask |= selectors.EVENT_WRITE
            if conn.upstream is not None:
                if conn.connecting:
                    upstream_mask = selectors.EVENT_WRITE
                else:
                    if not conn.upstream_eof and len(conn.down) < MAX_BUFFER:
                        upstream_mask |= selectors.EVENT_READ
                    if conn.up:
                        upstream_mask |= selectors.EVENT_WRITE
        self._interest(conn, conn.client, client_mask, "client")
        if conn.upstream is not None:
            self._interest(conn, conn.upstream, upstream_mask, "upstream")

    def _interest(self, conn: _Conn, sock: socket.socket, mask: int, side: str) -> None:
        assert self._sel is not None
        fd = sock.fileno()
        current = conn.masks.get(fd, 0)
        if mask == current:
            return
        if mask == 0:
            self._sel.unregister(sock)
            del conn.masks[fd]
        elif current == 0:
            self._sel.register(sock, mask, (conn, side))
            conn.masks[fd] = mask
        else:
            self._sel.modify(sock, mask, (conn, side))
            conn.masks[fd] = mask

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        for sock in (conn.client, conn.upstream):
            if sock is None:
                continue
            if self._sel is not None and sock.fileno() in conn.masks:
                try:
                    self._sel.unregister(sock)
                except (KeyError, ValueError):
                    pass
            sock.close()
        conn.masks.clear()

    def _close_all(self) -> None:
        for conn in list(self._conns):
            self._close(conn)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._sel is not None:
            self._sel.close()


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # already reset by the peer: the close that follows says the rest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Loopback TCP proxy that can blackhole its traffic.")
    parser.add_argument("target_port", type=int)
    parser.add_argument("--target-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=0)
    args = parser.parse_args(argv)
    # Block the signals before the proxy thread starts (it inherits the mask), then take them one
    # at a time with sigwait: no handler runs in the middle of a command.
    signals = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    with TcpProxy(args.target_port, target_host=args.target_host, listen_port=args.listen_port) as proxy:
        print(proxy.port, flush=True)
        while True:
            sig = signal.sigwait(signals)
            if sig == signal.SIGUSR1:
                proxy.partition()
            elif sig == signal.SIGUSR2:
                proxy.heal()
            else:
                break
            print(repr(proxy), file=sys.stderr, flush=True)
    return 0


__all__ = ["TcpProxy", "TcpProxyError", "main"]


if __name__ == "__main__":
    sys.exit(main())

