"""Keep Ray Serve replicas' internal gRPC servers off the network's other interfaces.

Ray Serve 2.60 starts, in every replica, a gRPC server for calls between deployments and
binds it to ``[::]:0``: every interface of the machine, whatever address the cluster runs
on. Its callers reach it at the replica's node IP (Serve records ``node_ip`` and the port),
so binding that IP alone serves them all, and on a local cluster (node IP 127.0.0.1) the
port stays on loopback. Ray checks its cluster token on that port (token auth is on for
every cluster cellfoundry starts, ``runtime.ensure_cluster_token``); this is defence in
depth on top of it.

Each deployment's ``__init__`` calls :func:`bind_replica_grpc_to_node_ip` first: Serve
constructs the user class before it opens the replica's gRPC port, so the rebinding is in
place in time. (A module-level call is not enough: Serve deployments are pickled by value,
so a replica need not import this module before its port opens.)
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_ALL_INTERFACES = "[::]:"


def bind_replica_grpc_to_node_ip() -> bool:
    """Make Serve replicas started in this process bind their internal gRPC server to this
    node's IP instead of ``[::]``. Returns False (and logs why) when this Ray version has no
    such hook, in which case the port stays on all interfaces, guarded by Ray's token."""
    try:
        from ray.serve._private import replica
    except ImportError:  # Serve not installed: nothing to rebind
        return False
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None:
        logger.warning(
            "this Ray Serve version has no replica.add_port_to_grpc_server: replicas' internal "
            "gRPC ports may listen on all interfaces (protected by Ray token auth only)"
        )
        return False
    if getattr(original, "_cellfoundry_node_ip", False):
        return True

    def add_port(server: Any, address: str) -> int:
        if address.startswith(_ALL_INTERFACES):
            import ray.util

            ip = ray.util.get_node_ip_address()
            host = f"[{ip}]" if ":" in ip else ip
            address = f"{host}:{address[len(_ALL_INTERFACES) :]}"
            logger.debug("binding the replica's internal gRPC server to %s", address)
        return original(server, address)

    add_port._cellfoundry_node_ip = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
    return True
