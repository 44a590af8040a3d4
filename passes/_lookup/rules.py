"""Named binding rules, their failures, and the tracer that remembers how far a binding got.

Binding a lookup's part runs a fixed sequence of rules, one per hypothesis family (where
the score tensors are, how each is laid out, which weights merge them, ...), each a module
with its name (``RULE``). A rule's ``check`` returns the alternatives it admits, or a
``Failure``: the rule's name, why, and the node it stopped at; a step built on helpers that
raise ``NotALookup`` runs inside ``RuleTracer.rule(name)``, which turns the refusal into
that rule's failure. The binder tries alternatives depth first; the ``RuleTracer`` keeps
the failure at the furthest rule any alternative reached (the first one there), so that a
refused lookup can be reported with how far its binding got, not only the last reason
(after onnxscript's ``MatchingTracer``, which keeps the best partial match per rule).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch.fx import Node


@dataclass(frozen=True)
class Failure:
    """Why ``rule`` admitted no alternative, and the node it stopped at (if one)."""

    rule: str
    reason: str
    node: str | None = None

    @classmethod
    def at(cls, rule: str, reason: str, node: Node | None = None) -> Failure:
        return cls(rule=rule, reason=reason, node=node.name if node is not None else None)


class NotALookup(Exception):
    """The anchors were found but the sub-graph between them cannot be bound; says why,
    and (``furthest``) the furthest rule the binding reached and its failure there."""

    def __init__(self, reason: str, furthest: Failure | None = None) -> None:
        super().__init__(reason)
        self.furthest = furthest


class RuleTracer:
    """The furthest failure among the alternatives tried, by position in ``rules``."""

    def __init__(self, rules: Sequence[str]) -> None:
        self.rules = tuple(rules)
        self.furthest: Failure | None = None

    def depth(self, failure: Failure) -> int:
        return self.rules.index(failure.rule)

    def record(self, failure: Failure) -> Failure:
        """Keep ``failure`` if it got further than every earlier one (ties: the first)."""
        if self.furthest is None or self.depth(failure) > self.depth(self.furthest):
            self.furthest = failure
        return failure

    def refuse(self, reason: str, failure: Failure | None = None) -> NotALookup:
        """The refusal to raise: ``reason`` as the binder always said it, with the
        furthest failure (``failure`` recorded first)."""
        if failure is not None:
            self.record(failure)
        return NotALookup(reason, self.furthest)

    @contextmanager
    def rule(self, name: str) -> Iterator[None]:
        """Run a step of rule ``name``: a ``NotALookup`` raised inside (by a helper that
        knows no rules) is recorded as that rule's failure and raised again, reason kept."""
        try:
            yield
        except NotALookup as exc:
            if exc.furthest is not None:
                self.record(exc.furthest)
            raise self.refuse(str(exc), Failure(rule=name, reason=str(exc))) from None


def furthest(failures: Sequence[Failure], rules: Sequence[str]) -> Failure | None:
    """The failure that got furthest along ``rules`` (ties: the first)."""
    tracer = RuleTracer(rules)
    for failure in failures:
        tracer.record(failure)
    return tracer.furthest
