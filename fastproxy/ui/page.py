"""The status page's handler: /ui/ (sign-in, the page, its script and style) and /ui/api/status.

One `StatusPage` per worker: on the gateway's tick it samples the metrics' request counters into
a `RateRing` and, with `workers = N`, writes its rings to the workers' share folder; its
`Denials` observer keeps the latest 401/403 answers. A poll of /ui/api/status reads the
clusters' probed health, the metrics' gauges and every worker's rings, so the page shows the
whole service whichever worker answers.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson

from ..auth.limiter import retry_after_header
from ..auth.requestinfo import request_info
from ..auth.scopes import check_scope
from ..local import LocalResponder
from ..login import TooMany, login_fields
from ..management.api import ADMINS
from ..observe.metrics import DURATION_AT, merge, read_states, write_state
from ..routing import UI
from ..status import StatusError
from . import html, session
from .rings import DENIED, WINDOW, DenialRing, RateRing, cluster_rows, merge_denials, merge_rates, recent_namespaces, request_totals

if TYPE_CHECKING:
    from ..auth.credentials import Authenticator
    from ..auth.identity import Identity
    from ..config import Config
    from ..context import Observers, RequestContext
    from ..exchange import Connection
    from ..login import AuthEndpoints
    from ..management.probe import ClusterProbe
    from ..observe.metrics import Metrics

log = logging.getLogger("fastproxy.ui")

SHARE_SUBFOLDER = "ui"   # in the metrics share folder: one file of rings per worker
STALE_FILE = 600.0       # seconds after which an ended worker's file is removed
PATH_SHOWN = 200         # bytes of a denied request's path kept
PROBE_AGE = 3.0          # while the page is watched, clusters are probed at least this often
NEW_KEY_CHECKS, NEW_KEY_CHECK_INTERVAL = 10, 0.1  # seconds: a new key may take one store poll to reach a worker
_PAGE_INFO = request_info("GET", "/ui/", "")  # what a scoped key's rules are checked against

# Every answer of /ui/: no framing by other sites, no inline script, nothing from elsewhere.
SECURITY_HEADERS = (
    (b"Content-Security-Policy", b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"X-Frame-Options", b"DENY"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"same-origin"),  # not no-referrer: with it a browser posts forms with "Origin: null"
)
HTML = b"text/html; charset=utf-8"
STATIC = {"/app.js": (b"text/javascript; charset=utf-8", "app.js"), "/style.css": (b"text/css; charset=utf-8", "style.css")}
_STATIC_BODIES = {path: (kind, resources.files(__package__).joinpath("static", name).read_bytes())
                  for path, (kind, name) in STATIC.items()}


class Denials:
    """The observer of refused requests, in batches (context.BatchObserver): the connection's part
    is the list append every batched observer shares; here, one comparison per request unless it
    was refused."""

    __slots__ = ("ring",)

    batched = True

    def __init__(self) -> None:
        self.ring = DenialRing()

    def start_batch(self, begun: list[RequestContext]) -> None:
        """Nothing: a denial is known when the request has finished."""

    def finish_batch(self, done: list[RequestContext]) -> None:
        wall = time.time() - time.monotonic()  # + a monotonic time: that time on the wall clock
        for ctx in done:
            if ctx.status in DENIED:
                route, identity = ctx.route, ctx.identity
                path = ctx.head.target.partition(b"?")[0][:PATH_SHOWN].decode("latin-1")  # a query may hold anything
                self.ring.add(wall + ctx.ended, ctx.status, identity.user if identity is not None else "", ctx.method,
                              path, route.cluster if route is not None else "", ctx.head.client_ip.decode("latin-1"),
                              ctx.message)


class StatusPage:
    """One worker's status page (see the module docstring)."""

    def __init__(self, config: Config, authenticator: Authenticator, probe: ClusterProbe,
                 metrics: Metrics | None, share: str | None, login: AuthEndpoints | None = None):
        self.config = config
        self.authenticator = authenticator
        # The /auth/ login's checker and back-off, for the password sign-in (None: keys only).
        self.login = login if login is not None and login.checker is not None else None
        self.probe = probe
        self.metrics = metrics
        self.share = os.path.join(share, SHARE_SUBFOLDER) if share is not None else None
        self.rates = RateRing()
        self.denials = Denials()

    def responder(self, client: Connection, ctx: RequestContext, observers: Observers, keep_alive: bool) -> UIRequest:
        return UIRequest(client, ctx, observers, keep_alive, self)

    # --- once a second -----------------------------------------------------------------------

    def tick(self) -> None:
        metrics = self.metrics
        if metrics is not None:
            # The page's own polls are left out: watching the charts should not draw on them.
            series = [by_code for table in (metrics.short, metrics.long) for labels, by_code in table.items() if labels[0] != UI]
            self.rates.sample(int(time.time()), *request_totals(series, DURATION_AT))
        if self.share is not None:
            try:
                os.makedirs(self.share, exist_ok=True)
                write_state(self.share, os.getpid(), self._rings())
            except OSError as error:
                log.error("status page: cannot write %s: %s", self.share, error)

    def _rings(self) -> dict[str, Any]:
        return {"rates": list(self.rates.samples), "denials": list(self.denials.ring.entries)}

    # --- what a poll reads -------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        """The status of the whole service, as /ui/api/status answers it."""
        self.probe.hasten(PROBE_AGE)
        now = time.time()
        rings = [self._rings()]
        if self.share is not None:
            rings += self._other_workers(now)
        gauges = None
        if self.metrics is not None:
            states = [self.metrics.state()]
            if self.metrics.share is not None:
                states += [state for _, state in read_states(self.metrics.share, exclude=os.getpid())]
            gauges = merge(states)
        store = self.authenticator.store
        activities = store.reader.snapshot.activities.values() if store is not None else ()
        health = {upstream.cluster.name: self.probe.of(upstream.cluster.name) for upstream in self.probe.clusters}
        return {
            "generated": round(now, 3), "workers": len(rings), "window": WINDOW,
            "clusters": cluster_rows(health, gauges["watches"] if gauges else None, gauges["tunnels"] if gauges else None),
            "rates": merge_rates((ring["rates"] for ring in rings), int(now)) if self.metrics is not None else None,
            "namespaces": recent_namespaces(activities),
            "denials": merge_denials(ring["denials"] for ring in rings),
        }

    def _other_workers(self, now: float) -> list[dict[str, Any]]:
        assert self.share is not None
        found = []
        for pid, rings in read_states(self.share, exclude=os.getpid()):
            try:
                path = os.path.join(self.share, f"{pid}.json")
                if now - os.stat(path).st_mtime > STALE_FILE:  # a worker that ended long ago
                    os.unlink(path)
                    continue
            except OSError:
                continue
            found.append(rings)
        return found

    # --- who may look ------------------------------------------------------------------------

    def signed_in(self, ctx: RequestContext) -> Identity | None:
        """The identity of the request's session cookie, authenticated afresh; None without a valid one."""
        return self.identity(session_of(ctx), ctx)

    def identity(self, signed: session.Session | None, ctx: RequestContext) -> Identity | None:
        if signed is None:
            return None
        try:
            identity = ctx.identity = self.authenticator.authenticate(signed.key, None)
        except StatusError:
            return None
        return identity


def session_of(ctx: RequestContext) -> session.Session | None:
    """The session the request's cookie holds, or None."""
    value = session.cookie_value([value for name, value in ctx.head.headers if name.lower() == b"cookie"])
    return session.unseal(value) if value else None


def may_see(identity: Identity) -> bool:
    """The management API's administrators; a scoped key must also allow GET on /ui/."""
    return ADMINS in identity.groups and (identity.scope is None or check_scope(identity.scope, _PAGE_INFO, "Management") is None)


class UIRequest(LocalResponder):
    """One request below /ui/."""

    __slots__ = ("page",)
    body_limit = session.MAX_FORM

    def __init__(self, client: Connection, ctx: RequestContext, observers: Observers, keep_alive: bool, page: StatusPage):
        super().__init__(client, ctx, observers, keep_alive)
        self.page = page

    def handle(self) -> None:
        route = self.ctx.route
        assert route is not None
        path, method = route.path, self.ctx.head.method
        reading = method in (b"GET", b"HEAD")
        if path in _STATIC_BODIES and reading:
            kind, body = _STATIC_BODIES[path]
            self.answer(200, body, kind)
        elif path == "/" and reading:
            self.page_view()
        elif path == "/api/status" and reading:
            self.status()
        elif path in ("/signin", "/signout") and method == b"POST":
            self.check_origin()
            if path == "/signin":
                self.sign_in()
            else:
                self.run(self.sign_out())
        elif path in _STATIC_BODIES or path in ("/", "/api/status", "/signin", "/signout"):
            raise StatusError(405, f"the method {method.decode('latin-1')} is not allowed on /ui{path}")
        else:
            raise StatusError(404, f"the status page has no /ui{path}")

    @property
    def tls(self) -> bool:
        return self.page.config.server.tls

    def answer(self, status: int, body: bytes, kind: bytes = HTML, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self.send(status, body, kind, SECURITY_HEADERS + headers)

    def page_view(self) -> None:
        signed = session_of(self.ctx)
        identity = self.page.identity(signed, self.ctx)
        if identity is None and signed is not None and signed.made_here:
            self.run(self.page_view_once_known(signed))
        else:
            self.show(identity)

    async def page_view_once_known(self, signed: session.Session) -> None:
        """A Login key the sign-in just made on another worker reaches this worker's snapshot
        within one poll of the store (SQLite: 0.25 s): wait that long rather than sign out."""
        identity = None
        for _ in range(NEW_KEY_CHECKS):
            await asyncio.sleep(NEW_KEY_CHECK_INTERVAL)
            identity = self.page.identity(signed, self.ctx)
            if identity is not None:
                self.show(identity)
                return
        # Still unknown: revoked or expired meanwhile. The form, and the cookie gone with it.
        self.answer(200, self.signin_form(), headers=((b"Set-Cookie", session.set_cookie("", 0, self.tls)),))

    def show(self, identity: Identity | None) -> None:
        if identity is None:
            self.answer(200, self.signin_form())
        elif not may_see(identity):
            self.answer(403, html.refused(f"{identity.user} is not an administrator: the status page is for loft:admins."))
        else:
            self.observers.flush()  # the requests observed until now
            self.answer(200, html.dashboard(self.page.document(), identity.user))

    def status(self) -> None:
        identity = self.page.signed_in(self.ctx)
        if identity is None:
            raise StatusError(401, "Unauthorized: sign in at /ui/")
        if not may_see(identity):
            raise StatusError(403, f'forbidden: User "{identity.user}" cannot get path "/ui/api/status"')
        self.observers.flush()  # the requests observed until now
        self.answer(200, orjson.dumps(self.page.document()), b"application/json")

    def check_origin(self) -> None:
        found = {name.lower(): value for name, value in self.ctx.head.headers if name.lower() in (b"origin", b"host")}
        if not session.same_origin(found.get(b"origin"), found.get(b"host"), self.tls):
            raise StatusError(403, "forbidden: a sign-in form must be posted from this gateway's own page")

    def signin_form(self, message: str = "") -> bytes:
        return html.signin(message, passwords=self.page.login is not None)

    def sign_in(self) -> None:
        kind = next((value for name, value in self.ctx.head.headers if name.lower() == b"content-type"), b"")
        if kind.split(b";")[0].strip().lower() != b"application/x-www-form-urlencoded":
            raise StatusError(415, "the sign-in form must be application/x-www-form-urlencoded")
        form = session.form_fields(b"".join(self.body))
        self.body.clear()
        if form.username is not None or form.password is not None:
            self.run(self.password_sign_in(form.username, form.password))
            return
        try:
            if form.key is None:
                raise StatusError(401, "Unauthorized: no key given")
            identity = self.ctx.identity = self.page.authenticator.authenticate(form.key, None)
        except StatusError as refusal:
            self.ctx.message = refusal.message
            self.answer(401, self.signin_form("That key was not accepted."))
            return
        if may_see(identity):
            self.admit(form.key, made_here=False)
        else:
            self.refuse_non_admin(identity)

    async def password_sign_in(self, username: str | None, password: str | None) -> None:
        """The /auth/ password login (its checker and back-off, shared with /auth/password/login):
        a new Login key for the user, sealed in the cookie and revoked again at sign-out."""
        login = self.page.login
        if login is None:
            self.answer(400, self.signin_form("This gateway has no state store, so no passwords: use an access key."))
            return
        try:
            username, password = login_fields(username, password)
        except StatusError as refusal:
            self.ctx.message = refusal.message
            self.answer(400, self.signin_form("Give a user name and a password (" + refusal.message + ")."))
            return
        try:
            user = await login.verify(username, password, self.ctx.head.client_ip.decode("latin-1"))
        except TooMany as refusal:
            seconds = retry_after_header(refusal.wait)
            self.ctx.message = refusal.message
            why = refusal.message.partition(":")[0]  # "too many failed logins", "... logins in progress"
            self.answer(429, self.signin_form(f"{why.capitalize()}: try again in {seconds} s."),
                        headers=((b"Retry-After", b"%d" % seconds),))
            return
        except StatusError as refusal:
            self.ctx.message = refusal.message
            self.answer(401, self.signin_form("That user name and password were not accepted."))
            return
        _, secret = await login.create_login_key(user, "status page sign-in")
        key = secret.encode()
        identity = self.ctx.identity = self.page.authenticator.authenticate(key, None)
        if may_see(identity):
            self.admit(key, made_here=True)
        else:  # the key is of no use to the page: gone at once
            await login.revoke_login_key(key)
            self.refuse_non_admin(identity)

    async def sign_out(self) -> None:
        """End the session; a Login key the sign-in made is revoked, a pasted key is left alone."""
        signed = session_of(self.ctx)
        if signed is not None and signed.made_here and self.page.login is not None:
            await self.page.login.revoke_login_key(signed.key)
        self.answer(303, b"", HTML, ((b"Location", b"/ui/"), (b"Set-Cookie", session.set_cookie("", 0, self.tls))))

    def admit(self, key: bytes, made_here: bool) -> None:
        lifetime = self.page.config.ui.session_seconds
        cookie = session.set_cookie(session.seal(key, time.time() + lifetime, made_here), lifetime, self.tls)
        self.answer(303, b"", HTML, ((b"Location", b"/ui/"), (b"Set-Cookie", cookie)))

    def refuse_non_admin(self, identity: Identity) -> None:
        self.ctx.message = f"{identity.user} is not an administrator"
        self.answer(403, html.refused(f"{identity.user} is not an administrator: the status page is for loft:admins."))
