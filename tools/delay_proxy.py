"""A TCP proxy that delays every byte by half a round trip each way: a far link on one machine.

``python -m specdec.tools.delay_proxy --listen 127.0.0.1:50060 --to 127.0.0.1:50052 --rtt-ms 200``
puts a 200 ms round trip between whoever connects to port 50060 and the service at 50052; `specdec
cluster up --verify-link-rtt-ms 200` puts one between the orchestrator and the verify service (the
edge-drafting topology: drafts beside the orchestrator, the target far away). Bytes are held, not
throttled: each chunk is forwarded ``rtt / 2`` after it arrived, in order, so what is measured is the
link's delay alone. Written by hand because the kernel's netem (``tc qdisc ... delay``) needs root
and a module that containers and CI machines often lack; asyncio's streams do the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time



class DelayProxy:
    """``with DelayProxy(target, rtt_ms) as proxy:`` connect to ``proxy.address`` (served from a
    thread of this process until the block ends)."""

    def __init__(self, target: str, rtt_ms: float, listen: str | None = None) -> None:
        self.target, self.delay_s = target, rtt_ms / 2e3
        self.address = listen or "127.0.0.1:0"  # port 0: a free one, known once listening
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def __enter__(self) -> DelayProxy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10) or self._server is None:
            raise RuntimeError(f"the delay proxy could not listen on {self.address}")

    def stop(self) -> None:
        """Close the listening socket and every connection through the proxy."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        host, port = self.address.rsplit(":", 1)
        try:
            self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, host, int(port)))
            self.address = f"{host}:{self._server.sockets[0].getsockname()[1]}"
        finally:
            self._ready.set()
        self._loop.run_forever()

    async def _accept(self, client_reader, client_writer) -> None:
        host, port = self.target.rsplit(":", 1)
        try:
            server_reader, server_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer))

    async def _pipe(self, reader, writer) -> None:
        """Forward what ``reader`` gives to ``writer``, each chunk half a round trip after it arrived."""
        held: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while (item := await held.get()) is not None:
                due, data = item
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        delivering = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(1 << 16):
                held.put_nowait((time.monotonic() + self.delay_s, data))
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            delivering.cancel()
            raise
        held.put_nowait(None)
        with contextlib.suppress(ConnectionError, OSError):
            await delivering
            writer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m specdec.tools.delay_proxy", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", required=True, help="host:port to accept connections on")
    parser.add_argument("--to", required=True, help="host:port of the service behind the link")
    parser.add_argument("--rtt-ms", type=float, required=True, help="the round trip to add (half each way)")
    args = parser.parse_args(argv)
    with DelayProxy(args.to, args.rtt_ms, args.listen) as proxy:
        print(f"delaying {proxy.address} -> {args.to} by {args.rtt_ms:g} ms a round trip; Ctrl-C stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
