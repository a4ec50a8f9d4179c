"""What changed between two states the dashboard was sent, as a patch the page applies to the one it holds: a run's
state is ~50 KB (a few hundred rows per chart and task), and a step record changes a few hundred bytes of it. Sent
whole on every record, a tab open on a Stage 4 run moved ~0.7 GiB a day over an SSH tunnel.

A patch is one of:
- `{"=": value}`: the value replaced whole;
- `{"+": [items]}`: a list that grew at its end (a chart's new rows), the new items;
- `{"~": {key: patch}, "-": [keys]}`: a dict whose keys changed (each by its own patch) or went (`-`).
`diff` gives None where nothing changed. The page's `applyPatch` (static/dashboard.js) and `apply` here read them
alike; a list that changed anywhere but its end (a chart thinned to half its rows) is replaced whole.
"""

from __future__ import annotations

import copy
from typing import Any

REPLACE, APPEND, CHANGED, REMOVED = "=", "+", "~", "-"


def _same(old: Any, new: Any) -> bool:
    """Equal as JSON, all the way down: 1 and 1.0 are, 1 and true are not (Python's == says they are)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same(value, new[key]) for key, value in old.items())
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new, strict=True))
    if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
        return False
    return isinstance(old, bool) == isinstance(new, bool) and old == new


def diff(old: Any, new: Any) -> dict | None:
    """The patch that turns `old` into `new` (JSON values: dicts, lists, scalars), None when they are the same."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed = {key: patch for key, value in new.items()
                   if (patch := diff(old[key], value) if key in old else {REPLACE: value}) is not None}
        removed = [key for key in old if key not in new]
        if not changed and not removed:
            return None
        patch: dict[str, Any] = {}
        if changed:
            patch[CHANGED] = changed
        if removed:
            patch[REMOVED] = removed
        return patch
    if isinstance(old, list) and isinstance(new, list) and len(new) >= len(old):
        if all(_same(a, b) for a, b in zip(old, new, strict=False)):
            return {APPEND: new[len(old):]} if len(new) > len(old) else None
        return {REPLACE: new}
    return None if _same(old, new) else {REPLACE: new}


def apply(value: Any, patch: dict | None) -> Any:
    """`value` with `patch` applied (a new value; `value` is left as it was)."""
    if patch is None:
        return copy.deepcopy(value)
    if REPLACE in patch:
        return copy.deepcopy(patch[REPLACE])
    if APPEND in patch:
        return [*copy.deepcopy(value), *copy.deepcopy(patch[APPEND])]
    out = {key: item for key, item in copy.deepcopy(value).items() if key not in patch.get(REMOVED, ())}
    for key, change in patch.get(CHANGED, {}).items():
        out[key] = apply(out.get(key), change)
    return out
