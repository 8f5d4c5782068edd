"""A topology file split into per-node files: each node's neighbourhood, nothing further.

The topology file is a lab convenience (one file for a whole federation). A
node needs only its neighbourhood: itself, its neighbours (address, ports,
kind), the links that join them (with the devices on them) and the SAEs it
serves, or that a foreign KMS beside it serves. :func:`neighbourhoods` cuts
that out of a parsed topology file, table for table, so a node file holds
the same tables as the topology file it came from; :func:`dump_toml` writes
one. ``kmstn config split`` and the lab launcher (lab.federation) use both;
kme.config.node refuses a per-node file that names anything more.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from kme.config.reader import read_toml
from kme.config.topology import load_topology

__all__ = ["LINK_TABLES", "dump_toml", "neighbourhoods", "split_topology_file"]

LINK_TABLES: Final = ("qkd_link", "pqc_link", "site_link")


def neighbourhoods(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per kmstn node of a parsed topology file, the tables of its neighbourhood.

    ``data`` must be a valid topology (load it with kme.config.load_topology
    first: this function trusts its shape).
    """
    kmstns = {k["id"]: k for k in data["kmstn"]}
    out: dict[str, dict[str, Any]] = {}
    for node, entry in kmstns.items():
        if entry.get("kind", "kmstn") != "kmstn":
            continue
        links = {t: [link for link in data.get(t, []) if node in (link["a"], link["b"])]
                 for t in LINK_TABLES}
        near = {link["b"] if link["a"] == node else link["a"]
                for table in links.values() for link in table}
        foreign = {n for n in near if kmstns[n].get("kind", "kmstn") == "foreign"}
        doc: dict[str, Any] = {
            "federation": dict(data["federation"]),
            # This node first, then its neighbours in the topology's order.
            "kmstn": [entry] + [k for n, k in kmstns.items() if n in near],
        }
        doc.update({t: v for t, v in links.items() if v})
        saes = [s for s in data.get("sae", []) if s["kmstn"] == node or s["kmstn"] in foreign]
        if saes:
            doc["sae"] = saes
        out[node] = doc
    return out


def split_topology_file(path: Path) -> dict[str, dict[str, Any]]:
    """Validate a topology file, then return each kmstn node's neighbourhood tables."""
    load_topology(path)  # every field checked, errors naming the field
    return neighbourhoods(read_toml(path.resolve()))


# -- writing TOML --------------------------------------------------------------------------

_BARE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _key(key: str) -> str:
    return key if key and set(key) <= _BARE else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML has no {value}")
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(v, Mapping) for v in value))


def dump_toml(data: Mapping[str, Any], header: str = "") -> str:
    """TOML text for ``data``: scalars, tables and arrays of tables, nested."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]

    def emit(path: tuple[str, ...], table: Mapping[str, Any]) -> None:
        for k, v in table.items():
            if not isinstance(v, Mapping) and not _is_table_array(v):
                lines.append(f"{_key(k)} = {_value(v)}")
        for k, v in table.items():
            name = ".".join(_key(p) for p in (*path, k))
            if isinstance(v, Mapping):
                lines.extend(("", f"[{name}]"))
                emit((*path, k), v)
            elif _is_table_array(v):
                for item in v:
                    lines.extend(("", f"[[{name}]]"))
                    emit((*path, k), item)

    emit((), data)
    return "\n".join(lines).lstrip("\n") + "\n"
