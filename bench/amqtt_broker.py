"""A bare amqtt broker configured exactly as the orchestrator embeds it: ``python -m bench.amqtt_broker HOST PORT``.

The ``embedded`` scenario's baseline runs a paho subscriber on it, with no orchestrator consuming.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from orchestrator.broker import EmbeddedBroker


async def serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with EmbeddedBroker(host, port):
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
