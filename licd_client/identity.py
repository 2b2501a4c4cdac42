"""Who is asking for a lease: the `holder` map of a checkout (host, hostid, user, pid),
and what a site is: the host-id components a vendor's entitlement may be bound to.

The host id is `LICD_HOSTID` when set (containers), else a salted hash of the machine id
(/etc/machine-id), else a salted hash of the MAC address. A site's components are
salted hashes of its machine id, each network interface's MAC address and its host
name, so an entitlement bound to k of them survives a replaced NIC. The raw machine id
never leaves this module. No network I/O here, and no caching of the process id (forks).
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import socket
import uuid
from collections.abc import Mapping, Sequence

from .messages import Holder

HOSTID_ENV = "LICD_HOSTID"
MACHINE_ID_PATHS: tuple[str, ...] = ("/etc/machine-id", "/var/lib/dbus/machine-id")
#: The salt makes our host id specific to licd (as systemd's app-specific machine ids
#: do): another program hashing the same machine id gets a different, unlinkable value.
HOSTID_SALT = b"licd-hostid-v1"
#: Holder fields are at most this long on the wire (messages.Holder).
MAX_FIELD = 255


def _salted(secret: bytes) -> str:
    return hmac.new(secret, HOSTID_SALT, hashlib.sha256).hexdigest()[:32]


def _read_machine_id(paths: Sequence[str]) -> str | None:
    for path in paths:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text:
            return text
    return None


def hostid(
    env: Mapping[str, str] | None = None,
    machine_id_paths: Sequence[str] = MACHINE_ID_PATHS,
) -> str:
    """A stable identifier of this machine (see the module docstring).

    Raises ValueError when `LICD_HOSTID` is longer than the protocol allows.
    """
    override = (os.environ if env is None else env).get(HOSTID_ENV, "").strip()
    if override:
        if len(override) > MAX_FIELD:
            raise ValueError(f"{HOSTID_ENV} must be at most {MAX_FIELD} characters")
        return override
    machine_id = _read_machine_id(machine_id_paths)
    if machine_id is not None:
        return _salted(machine_id.encode())
    return _salted(b"node:%012x" % uuid.getnode())


NET_DIR = "/sys/class/net"
#: At most this many MAC addresses are components (an entitlement names at most 16).
MAX_MACS = 8


def site_components(
    machine_id_paths: Sequence[str] = MACHINE_ID_PATHS,
    net_dir: str = NET_DIR,
    host: str | None = None,
) -> list[str]:
    """This machine's host-id components, as `kind:hash` strings: `machine:` (the
    machine id), `mac:` (each interface's MAC address, loopback and all-zero ones left
    out) and `host:` (the host name). Each is salted like `hostid`."""
    out = []
    machine_id = _read_machine_id(machine_id_paths)
    if machine_id is not None:
        out.append("machine:" + _salted(machine_id.encode()))
    macs: set[str] = set()
    try:
        names = sorted(os.listdir(net_dir))
    except OSError:
        names = []
    for name in names:
        try:
            with open(os.path.join(net_dir, name, "address"), encoding="ascii") as f:
                mac = f.read().strip().lower()
        except (OSError, UnicodeDecodeError):
            continue
        if mac and mac.strip("0:") and name != "lo":
            macs.add("mac:" + _salted(b"mac:" + mac.encode()))
    out += sorted(macs)[:MAX_MACS]
    out.append("host:" + _salted(b"host:" + (host or hostname()).encode()))
    return out


def username() -> str:
    """The login name, or the numeric uid when the user database does not know it."""
    try:
        name = getpass.getuser()
    except Exception:  # KeyError or OSError when no passwd entry (containers)
        name = ""
    return (name or str(os.getuid()))[:MAX_FIELD]


def hostname() -> str:
    return (socket.gethostname() or "localhost")[:MAX_FIELD]


def holder(app: str | None = None, instance: str | None = None) -> Holder:
    """The holder map for a checkout made by this process now."""
    return Holder(
        host=hostname(),
        hostid=hostid(),
        user=username(),
        pid=os.getpid(),
        app=None if app is None else app[:MAX_FIELD],
        instance=None if instance is None else instance[:MAX_FIELD],
    )
