"""Nested impersonation (`kubectl --as`): who the caller asks to act as, and whether the cluster agrees.

The caller's Impersonate-* headers are parsed as the API server's impersonation filter reads
them; each requested user, group, uid and extra value becomes one `impersonate` check, asked of
the target cluster as a SubjectAccessReview for the authenticated identity. Only when every
check is allowed does the nested identity go upstream, in place of the caller's own.
"""
from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import unquote

import orjson

from ..status import StatusError
from ..upstream_client import UpstreamRequestError, request
from .identity import HeaderValueError, Identity, check_header_value, identity_header_lines

if TYPE_CHECKING:
    from ..clusters import Upstream

SUBJECT_ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
AUTHENTICATED = "system:authenticated"
_AUTHENTICATION_GROUP = "authentication.k8s.io"
_SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
_EXTRA_PREFIX = b"impersonate-extra-"
_BAD_ESCAPE = re.compile(r"%(?![0-9a-fA-F]{2})")


class Check(NamedTuple):
    """One permission the caller needs, as SubjectAccessReview resourceAttributes."""

    group: str
    resource: str
    subresource: str
    namespace: str
    name: str
    verb: str = "impersonate"

    def describe(self) -> str:
        what = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        where = f" in namespace {self.namespace!r}" if self.namespace else ""
        return f"{what} {self.name!r}{where}"


@dataclass(frozen=True, slots=True)
class NestedIdentity:
    """Whom the caller asked to act as."""

    user: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (key, values), keys decoded

    def checks(self) -> tuple[Check, ...]:
        """The permissions to impersonate it, in the API server's order: user, groups, extra, uid."""
        if self.user.startswith(_SERVICE_ACCOUNT_PREFIX) and self.user.count(":") == 3:
            namespace, name = self.user[len(_SERVICE_ACCOUNT_PREFIX):].split(":")
            checks = [Check("", "serviceaccounts", "", namespace, name)]
        else:
            checks = [Check("", "users", "", "", self.user)]
        checks += [Check("", "groups", "", "", group) for group in self.groups]
        checks += [Check(_AUTHENTICATION_GROUP, "userextras", key, "", value)
                   for key, values in self.extra for value in values]
        if self.uid:
            checks.append(Check(_AUTHENTICATION_GROUP, "uids", "", "", self.uid))
        return tuple(dict.fromkeys(checks))

    def headers(self) -> bytes:
        """The Impersonate-* lines sent upstream; extra keys escaped as client-go escapes them."""
        return identity_header_lines(self.user, self.groups, self.uid or None, self.extra)


def parse_impersonation(headers: Sequence[tuple[bytes, bytes]]) -> NestedIdentity:
    """Read Impersonate-* headers (names lower-cased); raises StatusError 400 for what the
    API server would refuse or read ambiguously."""
    user = uid = None
    groups: list[str] = []
    extra: dict[str, list[str]] = {}
    for name, raw in headers:
        value = _value(name, raw)
        if name == b"impersonate-user":
            if user is not None:
                raise StatusError(400, "more than one Impersonate-User header")
            user = value
        elif name == b"impersonate-group":
            groups.append(value)
        elif name == b"impersonate-uid":
            if uid is not None:
                raise StatusError(400, "more than one Impersonate-Uid header")
            uid = value
        elif name.startswith(_EXTRA_PREFIX) and len(name) > len(_EXTRA_PREFIX):
            extra.setdefault(_extra_key(name), []).append(value)
        else:
            raise StatusError(400, f"unknown impersonation header {name.decode('latin-1')!r}")
    if user is None:
        raise StatusError(400, "Impersonate-Group, Impersonate-Uid and Impersonate-Extra-* need Impersonate-User")
    return NestedIdentity(user, tuple(dict.fromkeys(groups)), uid or "",
                          tuple((key, tuple(values)) for key, values in sorted(extra.items())))


def _value(name: bytes, raw: bytes) -> str:
    try:
        return check_header_value(raw.decode(), name.decode("latin-1"))
    except (UnicodeDecodeError, HeaderValueError):
        raise StatusError(400, f"header {name.decode('latin-1')} must hold a non-empty UTF-8 name "
                               "without control characters or surrounding spaces") from None


def _extra_key(name: bytes) -> str:
    # As the API server: the lower-cased name after the prefix, then percent-decoded.
    encoded = name[len(_EXTRA_PREFIX):].decode("latin-1")
    if _BAD_ESCAPE.search(encoded):
        raise StatusError(400, f"header {name.decode('latin-1')} has an invalid percent-escape")
    try:
        return unquote(encoded, errors="strict")
    except UnicodeDecodeError:
        raise StatusError(400, f"header {name.decode('latin-1')} does not decode to UTF-8") from None


class Subject(NamedTuple):
    """Whom a SubjectAccessReview asks about, as the cluster sees it when the gateway impersonates it."""

    user: str
    groups: tuple[str, ...]
    uid: str = ""
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()


def subject_of(who: Identity | NestedIdentity) -> Subject:
    """A gateway identity (user and groups) or a nested one (uid and extra too) as a Subject."""
    if isinstance(who, NestedIdentity):
        return Subject(who.user, who.groups, who.uid, who.extra)
    return Subject(who.user, who.groups)


def review_body(who: Identity | NestedIdentity, check: Check) -> bytes:
    """The SubjectAccessReview asking whether `who` may do what `check` names."""
    attributes = {"verb": check.verb, "group": check.group, "resource": check.resource}
    for key in ("subresource", "namespace", "name"):
        if getattr(check, key):
            attributes[key] = getattr(check, key)
    subject = subject_of(who)
    # The groups the cluster gives this identity when the gateway impersonates it.
    groups = subject.groups if AUTHENTICATED in subject.groups else (*subject.groups, AUTHENTICATED)
    spec: dict[str, object] = {"user": subject.user, "groups": list(groups)}
    if subject.uid:
        spec["uid"] = subject.uid
    if subject.extra:
        spec["extra"] = {key: list(values) for key, values in subject.extra}
    spec["resourceAttributes"] = attributes
    return orjson.dumps({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec})


def review_answer(status: int, body: bytes) -> tuple[bool, str]:
    """(allowed, reason) from the cluster's answer; raises ValueError when it is no answer."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    if not 200 <= status < 300:
        message = answer.get("message") if isinstance(answer, dict) else None
        raise ValueError(f"the SubjectAccessReview was answered with HTTP {status}"
                         + (f": {message}" if isinstance(message, str) else ""))
    result = answer.get("status") if isinstance(answer, dict) else None
    if not isinstance(result, dict):
        raise ValueError("the SubjectAccessReview answer has no status")
    reason = result.get("reason") if isinstance(result.get("reason"), str) else ""
    return result.get("allowed") is True and result.get("denied") is not True, reason


class AccessReviewer:
    """Asks clusters SubjectAccessReviews for identities; an allowed answer is kept for `ttl`
    seconds, a denied one for `denied_ttl` (default: the same), at most `max_entries` of them.

    Concurrent requests for the same answer share one SubjectAccessReview.
    """

    def __init__(self, ttl: float = 10.0, max_entries: int = 10_000, denied_ttl: float | None = None):
        self.ttl = ttl
        self.denied_ttl = ttl if denied_ttl is None else denied_ttl
        self.max_entries = max_entries
        # (cluster, subject, check) -> (expires, the answer being or already fetched)
        self._answers: dict[tuple, tuple[float, asyncio.Future]] = {}

    def answer(self, upstream: Upstream, who: Identity | NestedIdentity, check: Check) -> asyncio.Future:
        """(allowed, reason) from `upstream`'s cluster, or the cached answer; the future raises
        UpstreamRequestError or ValueError when the cluster gave no answer."""
        key = (upstream.cluster.name, subject_of(who), check)
        now = time.monotonic()
        cached = self._answers.get(key)
        if cached is not None and now < cached[0]:
            return cached[1]
        if len(self._answers) >= self.max_entries:
            self._prune(now)
        answer = asyncio.ensure_future(self._ask(upstream, who, check))
        answer.add_done_callback(lambda done: self._settle(key, done))
        self._answers[key] = (now + self.ttl, answer)
        return answer

    async def _ask(self, upstream: Upstream, who: Identity | NestedIdentity, check: Check) -> tuple[bool, str]:
        status, body = await request(upstream, "POST", SUBJECT_ACCESS_REVIEWS, review_body(who, check),
                                     [("Content-Type", "application/json"), ("Accept", "application/json")],
                                     limit=1024 * 1024)
        return review_answer(status, body)

    def _settle(self, key: tuple, answer: asyncio.Future) -> None:
        cached = self._answers.get(key)
        if cached is None or cached[1] is not answer:
            return
        if answer.cancelled() or answer.exception() is not None:
            del self._answers[key]  # only answers are kept; a failure is asked again by the next request
        elif not answer.result()[0] and self.denied_ttl != self.ttl:
            self._answers[key] = (time.monotonic() + self.denied_ttl, answer)

    def _prune(self, now: float) -> None:
        self._answers = {key: entry for key, entry in self._answers.items() if now < entry[0]}
        while len(self._answers) >= self.max_entries:
            del self._answers[next(iter(self._answers))]  # the oldest


class ImpersonationReviewer(AccessReviewer):
    """Whether identities may impersonate (`kubectl --as`): one review per part of the nested identity."""

    async def refusal(self, upstream: Upstream, identity: Identity, nested: NestedIdentity) -> StatusError | None:
        """None when the cluster lets `identity` impersonate every part of `nested`."""
        checks = nested.checks()
        try:
            # Shielded: an answer is shared, so one waiter's cancellation must not cancel it for all.
            answers = await asyncio.gather(*(asyncio.shield(self.answer(upstream, identity, check))
                                             for check in checks))
        except (UpstreamRequestError, ValueError) as error:
            message = error.message if isinstance(error, UpstreamRequestError) else str(error)
            return StatusError(403, f"impersonation cannot be checked on cluster {upstream.cluster.name!r}: {message}")
        for check, (allowed, reason) in zip(checks, answers):
            if not allowed:
                return StatusError(403, f"user {identity.user!r} may not impersonate {check.describe()} on cluster "
                                        f"{upstream.cluster.name!r}" + (f": {reason}" if reason else ""))
        return None
