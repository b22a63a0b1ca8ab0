"""Demo content (namespaces, pods, configmaps, a deployment) and background activity on it."""
from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

from fastproxy.kube.selectors import FieldSelector, LabelSelector, Selection

from .discovery import CONFIGMAPS, DEPLOYMENTS, NAMESPACES, PODS, SECRETS, SERVICES
from .store import Store

SEED_NAMESPACES = ("default", "kube-system", "team-a", "team-b")
ACTIVITY_NAMESPACES = ("team-a", "team-b")
ACTIVITY_LABEL = "fastproxy.dev/activity"
_MAX_ACTIVITY_OBJECTS = 5


def _pod(namespace: str, name: str, labels: dict[str, str], *containers: tuple[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"containers": [{"name": c, "image": image} for c, image in containers]}}


def _configmap(namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace}, "data": data}


def seed_store(store: Store) -> None:
    for namespace in SEED_NAMESPACES:
        store.create(NAMESPACES, "", {"metadata": {"name": namespace}})
    web_labels = {"app": "web", "pod-template-hash": "5d4f8c7b9"}
    for pod in (
        _pod("kube-system", "coredns-7db6d8ff4d-x2kfp", {"k8s-app": "kube-dns"},
             ("coredns", "registry.k8s.io/coredns/coredns:v1.11.3")),
        _pod("default", "hello", {"app": "hello"}, ("hello", "busybox:1.36")),
        _pod("team-a", "web-5d4f8c7b9-h7k2m", web_labels, ("nginx", "nginx:1.27")),
        _pod("team-a", "web-5d4f8c7b9-q9w4z", web_labels, ("nginx", "nginx:1.27")),
        _pod("team-b", "api-0", {"app": "api", "tier": "backend"}, ("api", "python:3.12-slim"),
             ("metrics", "prom/statsd-exporter:v0.26.0")),
    ):
        store.create(PODS, pod["metadata"]["namespace"], pod)
    for configmap in (
        _configmap("kube-system", "coredns", {"Corefile": ".:53 {\n    forward . /etc/resolv.conf\n}\n"}),
        _configmap("default", "settings", {"greeting": "hello"}),
        _configmap("team-a", "app-config", {"LOG_LEVEL": "info", "REPLICAS": "2"}),
        _configmap("team-a", "feature-flags", {"new-ui": "true"}),
        _configmap("team-b", "app-config", {"LOG_LEVEL": "debug"}),
    ):
        store.create(CONFIGMAPS, configmap["metadata"]["namespace"], configmap)
    store.create(SECRETS, "team-a", {"metadata": {"name": "db-credentials"},
                                     "data": {"username": "YXBw", "password": "czNjcjN0"}})
    store.create(SERVICES, "default", {
        "metadata": {"name": "kubernetes", "labels": {"component": "apiserver"}},
        "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                 "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}})
    store.create(SERVICES, "team-a", {"metadata": {"name": "web"},
                                      "spec": {"selector": {"app": "web"},
                                               "ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}]}})
    store.create(DEPLOYMENTS, "team-a", {
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "nginx", "image": "nginx:1.27"}]}}},
    })


async def run_activity(store: Store, rate: float, stopping: asyncio.Event) -> None:
    """Create, annotate and delete labelled configmaps `rate` times a second, so watches see
    ADDED, MODIFIED and DELETED events; seeded objects are left alone."""
    chooser = random.Random(0)
    ours = Selection(LabelSelector.parse(f"{ACTIVITY_LABEL}=true"), FieldSelector())
    step = 0
    while not stopping.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), 1 / rate)
            return
        step += 1
        namespace = chooser.choice(ACTIVITY_NAMESPACES)
        if not store.exists(NAMESPACES, "", namespace):
            continue
        existing = store.list(CONFIGMAPS, namespace, ours).items
        roll = chooser.random()
        if not existing or (roll < 0.4 and len(existing) < _MAX_ACTIVITY_OBJECTS):
            store.create(CONFIGMAPS, namespace, {
                "metadata": {"generateName": "activity-", "labels": {ACTIVITY_LABEL: "true"}},
                "data": {"step": str(step)}})
        elif roll < 0.7:
            store.delete(CONFIGMAPS, namespace, chooser.choice(existing)["metadata"]["name"])
        else:
            target = chooser.choice(existing)
            target["metadata"].setdefault("annotations", {})["fastproxy.dev/step"] = str(step)
            store.update(CONFIGMAPS, namespace, target["metadata"]["name"], target)
