"""`pods/log`: a deterministic, made-up container log, optionally followed as a chunked stream."""
from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from .auth import is_true_flag
from .errors import bad_request

BACKLOG_LINES = 10
FOLLOW_INTERVAL = 1.0


def log_line(pod: str, container: str, number: int) -> str:
    return f"{pod}/{container}: log line {number}"


def _select_container(pod: dict[str, Any], requested: str | None) -> str:
    name = pod["metadata"]["name"]
    containers = [c.get("name", "") for c in pod.get("spec", {}).get("containers", [])]
    if requested:
        if requested not in containers:
            raise bad_request(f"container {requested} is not valid for pod {name}")
        return requested
    if len(containers) != 1:
        raise bad_request(f"a container name must be specified for pod {name}, "
                          f"choose one of: [{' '.join(containers)}]")
    return containers[0]


def _non_negative(query: Any, key: str) -> int | None:
    raw = query.get(key)
    if raw is None:
        return None
    if not raw.isdigit():
        raise bad_request(f"{key} must be a non-negative integer, not {raw!r}")
    return int(raw)


async def serve_log(request: web.Request, pod: dict[str, Any], stopping: asyncio.Event) -> web.StreamResponse:
    container = _select_container(pod, request.query.get("container"))
    tail = _non_negative(request.query, "tailLines")
    follow = is_true_flag(request.query.get("follow"))
    with_timestamps = is_true_flag(request.query.get("timestamps"))
    pod_name = pod["metadata"]["name"]
    started = datetime.strptime(pod["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ") \
        .replace(tzinfo=UTC)

    def render(number: int, at: datetime) -> bytes:
        line = log_line(pod_name, container, number)
        if with_timestamps:
            line = f"{at.strftime('%Y-%m-%dT%H:%M:%S.%f')}000Z {line}"
        return (line + "\n").encode()

    first = BACKLOG_LINES + 1 - min(tail if tail is not None else BACKLOG_LINES, BACKLOG_LINES)
    backlog = b"".join(render(n, started + timedelta(seconds=n)) for n in range(first, BACKLOG_LINES + 1))
    if not follow:
        return web.Response(body=backlog, content_type="text/plain")

    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    if backlog:
        await response.write(backlog)
    number = BACKLOG_LINES
    while not stopping.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), FOLLOW_INTERVAL)
            break
        number += 1
        await response.write(render(number, datetime.now(UTC)))
    return response
