"""Who a request runs as, once its credential is resolved."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Identity:
    """The subject a credential resolves to.

    `impersonation` is the precomputed block of `Impersonate-User` / `Impersonate-Group` header
    lines sent upstream, built once when the identity is loaded so the hot path only joins bytes.
    `scope` is the access key scope (None: unrestricted); `source` names the credential for logs
    and audit (an access key's name, never the key itself).
    """

    user: str
    groups: tuple[str, ...]
    source: str
    impersonation: bytes = field(repr=False)
    scope: Any = None
