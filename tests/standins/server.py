"""Serving an aiohttp application on 127.0.0.1 from a thread with its own event loop, so a
worker *process* can call a stand-in while the test's own code runs synchronously."""

from __future__ import annotations

import asyncio
import threading
from typing import Self

from aiohttp import web

from tests.harness import free_port


class ThreadedServer:
    """Subclasses fill :meth:`routes`; ``start()`` returns once the port answers."""

    def __init__(self) -> None:
        self.port = free_port()
        self.lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            self.routes(app)
            runner = web.AppRunner(app)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name=type(self).__name__, daemon=True)
        self._thread.start()
        assert ready.wait(10), f"{type(self).__name__} did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
