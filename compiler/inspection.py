"""What ``ultramem inspect`` reports: memory layers, what was fused and why not, the pass log."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..passes.lookups import PARTS, LookupReport, PartReport
from .rewrite import RewriteResult

# ops that must not remain outside the fused ops once every lookup is fused
LOOKUP_OPS = ("topk", "gather", "scatter", "scatter_add", "index.Tensor", "linalg_svd", "svd")


@dataclass
class Inspection:
    source: str
    memory_layers: list[dict[str, Any]]
    passes: list[dict[str, Any]]
    ops_before: dict[str, int]
    ops_after: dict[str, int]

    @property
    def lookup_ops_left(self) -> dict[str, int]:
        return {
            op: n
            for op, n in self.ops_after.items()
            if any(op == name or op.startswith(name + ".") for name in LOOKUP_OPS)
        }

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "lookup_ops_left": self.lookup_ops_left}

    def lines(self) -> list[str]:
        out = [f"model: {self.source}", f"memory layers: {len(self.memory_layers)}"]
        for layer in self.memory_layers:
            fused = " + ".join(layer["fused"]) or "nothing"
            out.append(f"  {layer['name']} ({layer['lookup']}): fused {fused}")
            for part in ("selection", "aggregation"):
                info = layer[part]
                if part in layer["fused"]:
                    out.append(f"    {part}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
                else:
                    out.append(f"    {part} NOT fused: {info.get('reason', '?')}{_reached(info)}")
        out.append("passes:")
        for p in self.passes:
            out.append(
                f"  {p['pass']}: {len(p['matched'])} matched, {len(p['changed'])} changed, "
                f"{len(p['refused'])} refused, nodes {p['nodes_before']} -> {p['nodes_after']}"
            )
            out += [f"    refused {r['node']}: {r['reason']}" for r in p["refused"]]
        total_before, total_after = sum(self.ops_before.values()), sum(self.ops_after.values())
        out.append(f"ops: {total_before} before -> {total_after} after")
        for op in sorted(set(self.ops_before) | set(self.ops_after)):
            before, after = self.ops_before.get(op, 0), self.ops_after.get(op, 0)
            if before != after:
                out.append(f"  {op}: {before} -> {after}")
        left = self.lookup_ops_left
        out.append(
            "lookup ops left outside the fused ops: "
            + (", ".join(f"{k}={v}" for k, v in left.items()) if left else "none")
        )
        return out


def _reached(info: dict[str, Any]) -> str:
    """`` (got as far as rule R[: why it failed there])`` for a refused part a binder ran on."""
    rule = info.get("furthest_rule")
    if rule is None:
        return ""
    why = info.get("furthest_reason")
    return f" (got as far as rule {rule}" + (f": {why})" if why != info.get("reason") else ")")


def fused_layer_table(rewrite: RewriteResult) -> list[dict[str, Any]]:
    """One entry per memory lookup of the original graph: which parts are fused
    (``selection``, ``aggregation``), each part's binding or the reason it is not (and,
    where a binder ran, ``furthest_rule``: how far its binding got). JSON, for ``inspect``
    and the manifest, from the fusion pass's typed ``LookupReport``s."""
    fuse = rewrite.fusion
    reports: dict[str, LookupReport] = fuse.details.get("lookups", {})
    table = []
    for name, final in zip(rewrite.plan.names, fuse.matched, strict=False):
        entry: dict[str, Any] = {"name": name, "lookup": final, "fused": []}
        report = reports.get(final) or LookupReport()
        for part in PARTS:
            info = report.part(part) or PartReport.refused("selection not fused")
            if final in rewrite.rolled_back:
                info = PartReport.refused(rewrite.rolled_back[final])
            if info.fused:
                entry["fused"].append(part)
            entry[part] = {k: v for k, v in info.to_json().items() if k != "fused"}
        table.append(entry)
    return table
