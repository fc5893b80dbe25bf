"""kstatus, as Flux reads it, and the conventions every Soma status must satisfy for it to be
read correctly.

`compute(obj)` follows sigs.k8s.io/cli-utils/pkg/kstatus/status for a custom resource (what
Flux's kustomize-controller and helm-controller wait on): a deletion timestamp is Terminating;
`status.observedGeneration` different from `metadata.generation` is InProgress;
`Reconciling=True` is InProgress; `Stalled=True` is Failed; anything else is Current. kstatus
does not read `Ready` for custom resources, which is why `violations(obj)` insists that a Soma
resource that is not Ready says so with `Reconciling` or `Stalled` (abnormal-true): otherwise
Flux would report a broken resource as Current.
"""

from __future__ import annotations

import re
from typing import Any

CURRENT, IN_PROGRESS, FAILED, TERMINATING = "Current", "InProgress", "Failed", "Terminating"
CAMEL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in ((obj.get("status") or {}).get("conditions") or [])}


def is_true(obj: dict[str, Any], type_: str) -> bool:
    return (conditions(obj).get(type_) or {}).get("status") == "True"


def compute(obj: dict[str, Any]) -> str:
    """kstatus' status of a custom resource."""
    meta = obj.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return TERMINATING
    status = obj.get("status") or {}
    if "observedGeneration" in status and status["observedGeneration"] != meta.get("generation"):
        return IN_PROGRESS
    for c in status.get("conditions") or []:
        if c.get("type") == "Reconciling" and c.get("status") == "True":
            return IN_PROGRESS
        if c.get("type") == "Stalled" and c.get("status") == "True":
            return FAILED
    return CURRENT


def violations(obj: dict[str, Any]) -> list[str]:
    """What in `obj`'s status breaks the kstatus conventions (empty: none)."""
    out: list[str] = []
    kind = obj.get("kind")
    status = obj.get("status") or {}
    if "observedGeneration" not in status:
        out.append("status.observedGeneration is missing")
    listed = [c.get("type") for c in status.get("conditions") or []]
    if len(listed) != len(set(listed)):
        out.append(f"condition types repeat: {listed}")
    conds = conditions(obj)
    for type_ in ("Ready", "Reconciling", "Stalled"):
        if type_ not in conds:
            out.append(f"no {type_} condition")
    for type_, c in conds.items():
        where = f"condition {type_}"
        if c.get("status") not in ("True", "False", "Unknown"):
            out.append(f"{where}: status {c.get('status')!r}")
        if not CAMEL.match(c.get("reason") or ""):
            out.append(f"{where}: reason {c.get('reason')!r} is not CamelCase")
        if not (c.get("message") or "").strip():
            out.append(f"{where}: no message")
        if not RFC3339.match(c.get("lastTransitionTime") or ""):
            out.append(f"{where}: lastTransitionTime {c.get('lastTransitionTime')!r}")
        if "observedGeneration" in c and c["observedGeneration"] != status.get("observedGeneration"):
            out.append(f"{where}: observedGeneration {c['observedGeneration']} differs from the status'")
    reconciling, stalled, ready = is_true(obj, "Reconciling"), is_true(obj, "Stalled"), is_true(obj, "Ready")
    if reconciling and stalled:
        out.append("Reconciling and Stalled are both True")
    if ready and (reconciling or stalled):
        out.append("Ready=True while Reconciling or Stalled is True")
    finished = kind == "Job" and (is_true(obj, "Complete") or is_true(obj, "Failed"))
    if not ready and not (reconciling or stalled) and not finished:
        out.append("Ready is not True but neither Reconciling nor Stalled says why: kstatus (Flux) would "
                   "report it Current")
    if kind == "Job":
        if is_true(obj, "Complete") and is_true(obj, "Failed"):
            out.append("a Job is both Complete and Failed")
        if is_true(obj, "Failed") and not stalled:
            out.append("a Failed Job must be Stalled=True, or kstatus (Flux) reports it Current")
        if is_true(obj, "Complete") and (reconciling or stalled):
            out.append("a Complete Job must be neither Reconciling nor Stalled")
    return out
