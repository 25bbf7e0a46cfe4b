"""A network namespace joined to this one by a veth pair, for tests where a node must not
share loopback with its peers: there, ``127.0.0.1`` and ``0.0.0.0`` are its own, as on a
separate host, so an address mixed up between nodes shows instead of working by chance.

Needs root (``CAP_NET_ADMIN``) and the ``ip`` tool; :func:`namespace_unavailable` says why
not when they are missing, for a test to skip with.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def namespace_unavailable() -> str | None:
    """Why a namespace cannot be made here, or None when one can."""
    if shutil.which("ip") is None:
        return "the ip tool (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making a network namespace needs root"
    probe = f"fsup-probe-{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        err = getattr(e, "stderr", b"") or b""
        return f"ip netns add failed: {err.decode(errors='replace').strip() or e}"
    _ip("netns", "del", probe)
    return None


class NetworkNamespace:
    """A namespace with a veth pair to this one: ``host_ip`` on this side, ``ns_ip``
    inside. Use as a context manager; leaving deletes both (processes started in it must
    have been stopped first)."""

    def __init__(self, subnet: int | None = None) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"fsup-{tag}"
        self._veth = f"fsv{tag}"  # interface names are limited to 15 characters
        third = subnet if subnet is not None else int(tag[:2], 16)
        self.host_ip, self.ns_ip = f"10.213.{third}.1", f"10.213.{third}.2"

    def __enter__(self) -> NetworkNamespace:
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self._veth + "a", "type", "veth", "peer", "name", self._veth + "b")
            _ip("link", "set", self._veth + "b", "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self._veth + "a")
            _ip("link", "set", self._veth + "a", "up")
            inside = ("netns", "exec", self.name, "ip")
            _ip(*inside, "addr", "add", f"{self.ns_ip}/30", "dev", self._veth + "b")
            _ip(*inside, "link", "set", self._veth + "b", "up")
            _ip(*inside, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # Deleting the namespace removes its end of the pair, and with it ours.
        for args in (("link", "del", self._veth + "a"), ("netns", "del", self.name)):
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                _ip(*args)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]
