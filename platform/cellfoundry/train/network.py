"""Ray Train's process group with its rendezvous store on the master's address only.

Ray Train connects the workers with ``torch.distributed`` (gloo on CPU, NCCL on GPU). Rank 0
hosts the rendezvous ``TCPStore``, and torch binds that server to every interface of the
machine (``[::]``), whatever ``MASTER_ADDR`` says. Anyone who reaches it can read and write
the store's keys (the addresses ranks use to find each other), and the store has no
authentication. :class:`NodeBoundTorchConfig` makes rank 0 bind the store to
``MASTER_ADDR`` (the node's IP, which is 127.0.0.1 on a local cluster) and hand torch the
bound socket (``TCPStore(master_listen_fd=...)``): the ranks still reach it, nothing else on
the network does. Gloo's own pair sockets already bind the address of the interface they
use.
"""

from __future__ import annotations

import importlib
import logging
import socket
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

logger = logging.getLogger(__name__)

_PATCHED = "_cellfoundry_bound_store"


def bind_rendezvous_store_to_master_addr() -> None:
    """In this worker process, make rank 0's ``TCPStore`` listen on the rendezvous address
    only (both ``env://`` and ``tcp://`` rendezvous go through the patched function)."""
    from torch.distributed import TCPStore

    # A module: `from torch.distributed import rendezvous` would give the function of that name.
    rdzv = importlib.import_module("torch.distributed.rendezvous")

    original = rdzv._create_c10d_store
    if getattr(original, _PATCHED, False):
        return

    def create_store(
        hostname: str, port: int, rank: int, world_size: int, timeout: Any, use_libuv: bool = True
    ) -> Any:
        if rank != 0 or rdzv._torchelastic_use_agent_store():
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((hostname, port))
        except OSError:
            sock.close()
            logger.warning(
                "could not bind the torch.distributed store to %s:%d; it listens on all "
                "interfaces for this run (docs/security.md)", hostname, port,
            )  # fmt: skip
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        logger.debug("torch.distributed store bound to %s:%d", hostname, port)
        return TCPStore(
            host_name=hostname, port=port, world_size=world_size, is_master=True,
            timeout=timeout, multi_tenant=True, use_libuv=use_libuv,
            master_listen_fd=sock.detach(),  # the store owns the bound socket from here
        )  # fmt: skip

    setattr(create_store, _PATCHED, True)
    rdzv._create_c10d_store = create_store


class _NodeBoundTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        worker_group.execute(bind_rendezvous_store_to_master_addr)
        super().on_start(worker_group, backend_config)


class NodeBoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store listens on ``MASTER_ADDR`` only."""

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _NodeBoundTorchBackend
