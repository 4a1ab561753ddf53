"""A TCP relay that delays every chunk, both directions: a slow link on loopback where the kernel has no netem."""

from __future__ import annotations

import asyncio
import threading


class DelayRelay:
    """127.0.0.1:port -> target, every chunk delivered `delay` seconds after it arrived, order kept, both directions."""

    def __init__(self, target_port: int, delay: float):
        self.target_port, self.delay = target_port, delay
        self.loop = asyncio.new_event_loop()
        # Connections the programs drop or leave open when the script ends are no finding: nothing to log about them.
        self.loop.set_exception_handler(lambda loop, context: None)
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait()

    def _serve(self, ready):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        self.loop.close()

    async def _client(self, reader, writer):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer), return_exceptions=True)
        for w in (up_w, writer):
            w.close()

    async def _pipe(self, reader, writer):
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - self.loop.time()))
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # a half-close, passed on: the other direction goes on

        task = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(1 << 20):
                queue.put_nowait((self.loop.time() + self.delay, data))
        except ConnectionError:
            pass  # the other side went away: deliver what came, then end
        queue.put_nowait(None)
        await task

    def stop(self) -> None:
        """Close the connections still open and end the loop (nothing left pending to complain when collected)."""

        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
