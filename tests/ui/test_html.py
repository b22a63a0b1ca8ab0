"""The status page's HTML: every value escaped, no inline script, no key."""
from __future__ import annotations

import pytest

from fastproxy.config import ConfigError, parse_config
from fastproxy.routing import NOT_SERVED, UI, route
from fastproxy.ui import html

HOSTILE = '<script>alert("x")</script>'


def document(**changes):
    doc = {"generated": 1_700_000_000.0, "workers": 2, "window": 300,
           "clusters": [{"name": "a", "phase": "Ready", "version": "v1.32.0", "latencyMs": 1.5, "checked": 1.0,
                         "message": HOSTILE, "watches": 1, "tunnels": 0}],
           "rates": {"bucketSeconds": 10, "end": 0, "requests": [0.0], "errors": [0.0]},
           "namespaces": [{"cluster": "a", "namespace": "n", "lastActivity": 1, "subject": HOSTILE, "verb": "get",
                           "resource": "pods", "virtualCluster": ""}],
           "denials": [{"time": 1.0, "code": 403, "user": HOSTILE, "method": "GET", "path": "/x/" + HOSTILE,
                        "cluster": "a", "sourceIP": "10.0.0.1", "message": HOSTILE}]}
    doc.update(changes)
    return doc


def test_every_value_on_the_page_is_escaped():
    page = html.dashboard(document(), user=HOSTILE).decode()
    assert HOSTILE not in page
    # The user, a cluster's note, a subject, and a denial's user, path and reason.
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") == 6
    assert page.count("<script") == 1 and '<script src="/ui/app.js"></script>' in page


def test_without_metrics_the_page_says_why_there_are_no_rates():
    assert b"need [metrics] enabled" in html.dashboard(document(rates=None), user="admin")
    assert b"need [metrics] enabled" not in html.dashboard(document(), user="admin")


def test_the_sign_in_form_posts_the_key_and_escapes_its_message():
    form = html.signin(HOSTILE).decode()
    assert form.count('method="post" action="/ui/signin"') == 2 and 'name="key" type="password"' in form
    assert 'name="username"' in form and 'name="password" type="password"' in form
    assert HOSTILE not in form and "<script" not in form
    keys_only = html.signin(passwords=False).decode()
    assert 'name="password"' not in keys_only and 'name="key"' in keys_only
    assert html.refused(HOSTILE).decode().count("&lt;script&gt;") == 1


def test_ui_routes():
    assert route("/ui/") == route("/ui") == route("/ui/./") and route("/ui").kind == UI and route("/ui").path == "/"
    assert route("/ui/api/status?x=1").path == "/api/status"
    assert "[ui] enabled = false" in NOT_SERVED[UI]


def test_the_ui_table():
    assert parse_config({}).ui.enabled and parse_config({}).ui.session_seconds == 1800
    config = parse_config({"ui": {"enabled": False, "session_seconds": 600}}).ui
    assert (config.enabled, config.session_seconds) == (False, 600)
    for table, message in (({"enabled": "yes"}, r"^ui.enabled: must be true or false"),
                           ({"session_seconds": 0}, r"^ui.session_seconds: must be > 0"),
                           ({"session_seconds": 86400}, r"^ui.session_seconds: must be at most 43200"),
                           ({"colour": "blue"}, r"^ui.colour: unknown key")):
        with pytest.raises(ConfigError, match=message):
            parse_config({"ui": table})
