"""A stand-in for Grafana behind the gateway: records every request it gets, answers redirects,
cookies, a body echo, a WebSocket (as Grafana Live's) and one slow answer. Run as a process:

    python grafana_standin.py RECORD_FILE      (prints its port, then serves on 127.0.0.1)

Each request becomes one JSON line in RECORD_FILE: method, path with query, headers (as pairs,
in order, repeated ones kept) and body.
"""
from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import WSMsgType, web


def main(record_file: str) -> None:
    record = open(record_file, "a", buffering=1)

    @web.middleware
    async def recording(request: web.Request, handler):
        body = await request.read()
        record.write(json.dumps({"method": request.method, "path": request.path_qs,
                                 "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in request.raw_headers],
                                 "body": body.decode("latin-1")}) + "\n")
        return await handler(request)

    def redirect(location: str) -> web.Response:
        return web.Response(status=302, headers={"Location": location})

    async def login(request: web.Request) -> web.Response:
        response = redirect("/")
        response.headers.add("Set-Cookie", "grafana_session=s3ss10n; Path=/; Domain=grafana.internal; HttpOnly; SameSite=Lax")
        response.headers.add("Set-Cookie", "redirect_to=; Max-Age=0")
        response.headers.add("Set-Cookie", "loft_access_key=planted-by-grafana; Path=/")
        return response

    async def own_origin(request: web.Request) -> web.Response:
        return redirect(f"http://{request.host}/d/abc?orgId=1")

    async def elsewhere(request: web.Request) -> web.Response:
        return redirect("https://login.example.com/authorize?client_id=grafana")

    async def query(request: web.Request) -> web.Response:
        return web.json_response({"received": (await request.read()).decode()})

    async def live(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            if message.type is WSMsgType.TEXT:
                await socket.send_str("echo:" + message.data)
        return socket

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.json_response({})

    async def anything(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path_qs})

    app = web.Application(middlewares=[recording])
    app.add_routes([web.get("/login", login), web.get("/own-origin", own_origin), web.get("/elsewhere", elsewhere),
                    web.post("/api/ds/query", query), web.get("/api/live/ws", live), web.get("/slow", slow),
                    web.route("*", "/{tail:.*}", anything)])

    async def serve() -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main(sys.argv[1])
