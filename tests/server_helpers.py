"""Helpers the server tests share: uvicorn apps served over loopback in one background
thread, an engine whose steps explode, and one PyTorch thread per module (2 shared cores:
OpenMP teams of 2 stall badly when the cores are busy)."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Dict, Iterator

import uvicorn


@contextlib.contextmanager
def serving(apps: Dict[str, object], log_level: str = "warning") -> Iterator[Dict[str, str]]:
    """Serve each app on 127.0.0.1 (a free port), all on one event loop in a daemon thread;
    yields {name: base url} once every server listens, and stops them on exit."""
    srvs = {k: uvicorn.Server(uvicorn.Config(a, host="127.0.0.1", port=0, log_level=log_level, lifespan="off"))
            for k, a in apps.items()}

    async def serve_all():
        await asyncio.gather(*(s.serve() for s in srvs.values()))

    thread = threading.Thread(target=lambda: asyncio.run(serve_all()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not all(s.started for s in srvs.values()):
        assert time.monotonic() < deadline, "uvicorn did not start"
        assert thread.is_alive(), "uvicorn thread died"
        time.sleep(0.05)
    try:
        yield {k: f"http://127.0.0.1:{s.servers[0].sockets[0].getsockname()[1]}" for k, s in srvs.items()}
    finally:
        for s in srvs.values():
            s.should_exit = True
        thread.join(timeout=15)


class ExplodingEngine:
    """Wraps an LLMEngine; every step raises, as a crashed engine loop would."""

    def __init__(self, inner):
        self._inner = inner

    def step(self):
        raise RuntimeError("engine exploded")

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
