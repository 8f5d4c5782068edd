"""``kmstn federation status``: services up or down, and per link its key pools and state."""

from __future__ import annotations

from kme.channels import internal_channel
from kme.config import QkdLink, load_topology
from kme.errors import KmstnError
from kme.qkd import QkdDeviceClient
from lab.federation import Federation
from routing.client import RoutingClient

__all__ = ["render_status"]

SERVICES = ("gateway014", "gateway020", "routing", "keyvault", "relay")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def render_status(fed: Federation) -> str:
    if not fed.pids_path.exists():
        return f"no federation is running in {fed.state}"
    alive = fed.status()
    configs = fed.configs()
    rows = [[node, *("up" if alive.get(f"{node}/{svc}") else "DOWN" for svc in SERVICES)]
            for node in configs]
    parts = [_table(["KMSTN", *SERVICES], rows)]

    link_rows = []
    # The lab's whole picture: each node's own file holds only its neighbourhood.
    topology = load_topology(fed.topology_path)
    states: dict[str, str] = {}
    for link in topology.links:
        cfg = configs.get(link.a) or configs.get(link.b)
        if cfg is None or link.id in states:
            continue
        try:
            snap = RoutingClient(internal_channel(cfg, "routing"), timeout=2).topology()
            for ls in snap.links:
                states.setdefault(ls.link_id, ("up" if ls.up else "down") + f" (cost {ls.cost:g},"
                                  f" seen by {cfg.node_id})")
        except KmstnError:
            states.setdefault(link.id, "unknown (routing unreachable)")
    for link in topology.links:
        pools = []
        for end in (link.a, link.b):
            if not isinstance(link, QkdLink) or end not in configs:
                pools.append("-")
                continue
            access = configs[end].qkd_devices[link.id]
            client = QkdDeviceClient(link, end, access)
            try:
                st = client.status()
                pools.append(f"{st.stored_key_count}/{st.max_key_count}")
            except KmstnError:
                pools.append("unreachable")
            finally:
                client.close()
        device = "up" if link.kind != "qkd" or alive.get(f"{link.id}/qkdsim") else "DOWN"
        link_rows.append([link.id, link.kind, f"{link.a}-{link.b}",
                          states.get(link.id, "?"), device, *pools])
    parts.append(_table(["link", "kind", "ends", "routing state", "devices",
                         "keys at a", "keys at b"], link_rows))
    return "\n\n".join(parts)
