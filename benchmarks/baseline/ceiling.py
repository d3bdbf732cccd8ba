"""The HTTP ceiling of benchmarks/ingest.py: an aiohttp server whose POST handler does nothing.

It parses nothing and touches no Redis: it answers 200 with a body the size of the sidecar's. Served
like the sidecar (AppRunner, no access log, same backlog) on the loop asked for, so the project's
requests/s can be read as a fraction of what aiohttp itself can do on this machine.

    python benchmarks/baseline/ceiling.py --port 8801 --loop uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web

_BODY = b'{"accepted":1,"duplicates":0}'


async def post_events(request: web.Request) -> web.Response:
    """Answer 200 without reading the body (aiohttp drains it before reusing the connection)."""
    return web.Response(status=200, body=_BODY, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def serve(port: int) -> None:
    app = web.Application(client_max_size=512_001)
    app.router.add_post("/v1/events", post_events)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8801)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.port))
    else:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
