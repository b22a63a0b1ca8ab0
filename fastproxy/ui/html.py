"""The status page's HTML, rendered on the server from the status document; every value escaped.

The page's script (static/app.js) then polls /ui/api/status and redraws the same tables and the
charts; nothing here runs in the browser, and nothing holds a key.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from html import escape
from typing import Any

_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>fastproxy status</title><link rel="stylesheet" href="/ui/style.css"></head><body>
"""


def _table(table_id: str, headers: Iterable[str], rows: Iterable[Iterable[Any]], empty: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(_text(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return (f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{body or f"<tr><td>{escape(empty)}</td></tr>"}</tbody></table>')


def _text(value: Any) -> str:
    return "–" if value is None or value == "" else str(value)


def _clock(unix: float | None) -> str | None:
    return time.strftime("%H:%M:%S", time.gmtime(unix)) if unix else None


def cluster_cells(row: dict[str, Any]) -> list[Any]:
    latency = f"{row['latencyMs']} ms" if row["latencyMs"] is not None else None
    return [row["name"], row["phase"], row["version"], latency, row["watches"], row["tunnels"], row["message"]]


def dashboard(document: dict[str, Any], user: str) -> bytes:
    """The signed-in page: what the document says now, in tables the script keeps up to date."""
    clusters = _table("clusters", ("Cluster", "State", "Version", "Latency", "Watches", "Tunnels", "Note"),
                      (cluster_cells(row) for row in document["clusters"]), "no clusters configured")
    namespaces = _table("namespaces", ("Cluster", "Namespace", "Last active (UTC)", "Subject", "Verb", "Resource"),
                        ((n["cluster"], n["namespace"], _clock(n["lastActivity"]), n["subject"], n["verb"], n["resource"])
                         for n in document["namespaces"]), "no activity recorded")
    denials = _table("denials", ("Time (UTC)", "Code", "User", "Request", "Source", "Reason"),
                     ((_clock(d["time"]), d["code"], d["user"], f"{d['method']} {d['path']}", d["sourceIP"], d["message"])
                      for d in document["denials"]), "no denials")
    rates = "" if document["rates"] is not None else '<p class="note">Request rates need [metrics] enabled.</p>'
    return (_HEAD + f"""<header><h1>fastproxy status</h1>
<form method="post" action="/ui/signout"><span>{escape(user)}</span> <button type="submit">Sign out</button></form></header>
<p id="state" class="note">Updated <span id="updated">{escape(_clock(document['generated']) or '')}</span> UTC,
{document['workers']} worker(s).</p>
<h2>Clusters</h2>{clusters}
<h2>Requests per second, last {document['window'] // 60} minutes</h2>{rates}
<div class="charts"><figure><figcaption>all requests</figcaption><svg id="chart-requests" viewBox="0 0 300 60"></svg></figure>
<figure><figcaption>errors (5xx)</figcaption><svg id="chart-errors" viewBox="0 0 300 60"></svg></figure></div>
<h2>Recently active namespaces</h2>{namespaces}
<h2>Latest denials (401, 403)</h2>{denials}
<script src="/ui/app.js"></script></body></html>
""").encode()


def signin(message: str = "", passwords: bool = True) -> bytes:
    """The sign-in forms: a user name and password (the /auth/ login; with a state store) and an
    access key. Both go in a POST body, never in a URL."""
    note = f'<p class="error" id="error">{escape(message)}</p>' if message else ""
    password_form = """<form method="post" action="/ui/signin" autocomplete="off">
<label for="username">User name</label>
<input id="username" name="username" type="text" required autofocus autocomplete="username">
<label for="password">Password</label>
<input id="password" name="password" type="password" required autocomplete="current-password">
<button type="submit" id="signin-password">Sign in</button></form>
<p class="note">Or with an administrator access key:</p>
""" if passwords else ""
    return (_HEAD + f"""<main class="signin"><h1>fastproxy status</h1>{note}
{password_form}<form method="post" action="/ui/signin" autocomplete="off">
<label for="key">Administrator access key</label>
<input id="key" name="key" type="password" required{"" if passwords else " autofocus"}>
<button type="submit" id="signin">Sign in with the key</button></form>
<p class="note">Only users in the loft:admins group may see this page.</p></main></body></html>
""").encode()


def refused(message: str) -> bytes:
    """A page for a signed-in caller who may not see the status (not an administrator)."""
    return (_HEAD + f"""<main class="signin"><h1>fastproxy status</h1><p class="error" id="error">{escape(message)}</p>
<form method="post" action="/ui/signout"><button type="submit">Sign in as someone else</button></form></main></body></html>
""").encode()
