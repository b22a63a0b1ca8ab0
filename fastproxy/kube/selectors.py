"""Label and field selectors as the API server parses them from `labelSelector` / `fieldSelector`."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..status import StatusError

_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_SET_TERM = re.compile(r"^(?P<key>[^\s!=(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_COMPARE_TERM = re.compile(r"^(?P<key>[^\s!=(),]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=(),]*)$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "in", "notin", "exists", "!exists"; equality operators are normalised to in/notin
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op == "in":
            return self.key in labels and labels[self.key] in self.values
        return labels.get(self.key) not in self.values  # notin: absent keys match


class LabelSelector:
    def __init__(self, requirements: tuple[Requirement, ...] = ()):
        self.requirements = requirements

    @classmethod
    def parse(cls, text: str | None) -> LabelSelector:
        if not text or not text.strip():
            return cls()
        return cls(tuple(_parse_label_term(term.strip()) for term in _split_terms(text)))

    def matches(self, labels: dict[str, str] | None) -> bool:
        labels = labels or {}
        return all(req.matches(labels) for req in self.requirements)


def _split_terms(text: str) -> list[str]:
    """Split on the commas that are not inside an `in (...)` value list."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return terms


def _parse_label_term(term: str) -> Requirement:
    unparsable = StatusError(400, f"unable to parse requirement: {term!r}")
    if match := _SET_TERM.match(term):
        key = match["key"]
        values = frozenset(v.strip() for v in match["values"].split(","))
        op = match["op"]
    elif match := _COMPARE_TERM.match(term):
        key, values = match["key"], frozenset([match["value"]])
        op = "notin" if match["op"] == "!=" else "in"
    elif term.startswith("!"):
        key, values, op = term[1:].strip(), frozenset(), "!exists"
    else:
        key, values, op = term, frozenset(), "exists"
    if not _LABEL_KEY.match(key) or not all(_LABEL_VALUE.match(v) for v in values):
        raise unparsable
    return Requirement(key, op, values)


@dataclass(frozen=True)
class FieldRequirement:
    path: str
    value: str
    equal: bool

    def matches(self, obj: dict[str, Any]) -> bool:
        node: Any = obj
        for part in self.path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return (("" if node is None else str(node)) == self.value) == self.equal


class FieldSelector:
    def __init__(self, requirements: tuple[FieldRequirement, ...] = ()):
        self.requirements = requirements

    @classmethod
    def parse(cls, text: str | None, supported: tuple[str, ...]) -> FieldSelector:
        if not text or not text.strip():
            return cls()
        requirements = []
        for term in text.split(","):
            match = _COMPARE_TERM.match(term.strip())
            if not match:
                raise StatusError(400, f"invalid field selector: {term!r}")
            if match["key"] not in supported:
                raise StatusError(400, f'field label not supported: {match["key"]}')
            requirements.append(FieldRequirement(match["key"], match["value"], match["op"] != "!="))
        return cls(tuple(requirements))

    def matches(self, obj: dict[str, Any]) -> bool:
        return all(req.matches(obj) for req in self.requirements)


@dataclass(frozen=True)
class Selection:
    labels: LabelSelector
    fields: FieldSelector

    def matches(self, obj: dict[str, Any]) -> bool:
        return self.labels.matches(obj["metadata"].get("labels")) and self.fields.matches(obj)


EVERYTHING = Selection(LabelSelector(), FieldSelector())
