"""Names the gateway checks in paths, configuration and the state store."""
from __future__ import annotations

import re

# A Kubernetes object name (DNS-1123 subdomain): clusters, users, teams, access keys.
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
