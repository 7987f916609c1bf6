"""The fetch guard: which network addresses an http(s) fetch may connect to, and which local files a fetch may read.

Address guard (server-side request forgery; shared/reference/pipeline.md section 6.5). Each new connection of an
http(s) fetch, for the first request and for every redirect hop alike, resolves its host once with
`socket.getaddrinfo`, checks every address of the answer, and connects only to those checked addresses: the name is
never resolved a second time, so a DNS answer that changes between the check and the connect (rebinding) cannot slip
a private address in. TLS still verifies the URL's host name (SNI and certificate): only the socket is pinned.

Refused (error kind `blocked_address`, the message names the host, the address and why): loopback, private (RFC 1918,
unique-local fc00::/7), link-local (169.254/16 with the cloud metadata address, fe80::/10), multicast, reserved,
unspecified (0.0.0.0, ::), site-local fec0::/10, and any other address Python's `ipaddress` does not call global
(shared 100.64/10, documentation ranges). An IPv6 address that carries an IPv4 one is judged by that IPv4 address:
IPv4-mapped ::ffff:a.b.c.d and NAT64 64:ff9b::/96 instead of the IPv6 address, 6to4 2002::/16 as well as it.
Literal forms the resolver accepts (decimal 2130706433, short 127.1, octal 0177.0.0.1, hex 0x7f.1) resolve to the
address that is checked. If any address of an answer is refused, the host is refused.

Allow-list (`FetchConfig.allow_hosts`): host names, matched exactly and case-insensitively, and IP addresses or CIDR
networks. A listed name is trusted whatever it resolves to; any other host is admitted when each of its addresses is
public or inside a listed network. ("0.0.0.0/0", "::/0") turns the guard off.

Local roots (`FetchConfig.local_roots`): local paths and file:// URLs are read only when the path, with symlinks and
".." resolved, lies inside one of these folders and is a regular file (a FIFO or a device would block the reader, so
it is refused before opening). The resolved path is then opened from its root's folder one component at a time
without following links (O_NOFOLLOW), so a folder on the checked path swapped for a symlink between the check and
the open is refused, never followed out of the root; the opened file must be a regular file (fstat). No roots: no
local files. `risky_local_roots`
words a warning for roots that open far more than images ("/", a home folder), for the run summary.

Every connection of an attempt is registered with the attempt's deadline (pipeline.deadline), which shuts its socket
when the time is up, and is released from it when it goes back to the pool.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, cast

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family, create_connection

from . import deadline
from .errors import RowError
from .redact import redact

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix: the last 32 bits are the IPv4 address
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?", re.IGNORECASE)


def _ipv4_inside(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped or NAT64 address stands for; any other address as it is."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def address_problem(address: IPAddress) -> str | None:
    """Why `address` is no public unicast address ("a loopback address", ...), or None when it is one."""
    address = _ipv4_inside(address)
    for flag, what in (
        (address.is_unspecified, "an unspecified"),
        (address.is_loopback, "a loopback"),
        (address.is_link_local, "a link-local"),
        (address.is_multicast, "a multicast"),
        (address.is_private, "a private"),
        (address.is_reserved, "a reserved"),
    ):
        if flag:
            return f"{what} address"
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:
            return "a site-local address"
        if address.sixtofour is not None and (inner := address_problem(address.sixtofour)):
            return f"a 6to4 address carrying {address.sixtofour}, {inner}"
    if not address.is_global:
        return "not a globally routable address"
    return None


def _parse_ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text.split("%", 1)[0])  # a zone ("fe80::1%eth0") says nothing about the address


@dataclass(frozen=True)
class AllowList:
    """Trusted host names (lower case, no trailing dot) and networks."""

    names: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """From "images.internal", "127.0.0.1", "10.0.0.0/8", "[::1]", "fd00::/8"; ValueError names a bad entry."""
        names, networks = set(), []
        for entry in entries:
            if not isinstance(entry, str) or not entry.strip():
                raise ValueError(f"entries must be non-empty strings, got {entry!r}")
            text = entry.strip()
            try:
                networks.append(ipaddress.ip_network(text.removeprefix("[").removesuffix("]"), strict=False))
                continue
            except ValueError:
                pass
            if not _HOST_NAME.fullmatch(text):
                raise ValueError(
                    f"entry {entry!r} is neither a host name nor an IP address or network "
                    '(e.g. "images.internal", "127.0.0.1", "10.0.0.0/8"); no scheme, port or path'
                )
            names.add(text.lower().rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def admits_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.names

    def admits_address(self, address: IPAddress) -> bool:
        # The version check matters: ipaddress tests an IPv4 address against an IPv6 network by its integer alone.
        return any(a.version == n.version and a in n for a in {address, _ipv4_inside(address)} for n in self.networks)


class AddressGuard:
    """Resolves a host and checks its addresses against the rules above and an allow-list."""

    def __init__(self, allow_hosts: Iterable[str] = ()) -> None:
        self.allow = AllowList.parse(allow_hosts)

    def addresses(self, host: str, port: int) -> list[str]:
        """The checked addresses to connect to for host:port, in the resolver's order.

        Raises RowError("blocked_address") when any address is refused, RowError("invalid_input") for a name no
        resolver can look up (an empty label, "www..example.com", or one over 63 characters: the IDNA codec refuses
        them), socket.gaierror when the name does not resolve."""
        try:
            infos = socket.getaddrinfo(host, port, allowed_gai_family(), socket.SOCK_STREAM)
        except UnicodeError:
            raise RowError(
                "invalid_input",
                f"malformed host name {host!r}: a label (the text between dots) is empty or longer than 63 characters",
            ) from None
        # An IPv4-mapped address is connected to as plain IPv4: it needs no IPv6 stack and means the same host.
        targets: dict[str, IPAddress] = {}
        for info in infos:
            raw = str(info[4][0])  # the address, text for the internet families asked for
            parsed = _parse_ip(raw)
            inner = _ipv4_inside(parsed)
            mapped = isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None
            targets.setdefault(str(inner) if mapped else raw, parsed)
        if not self.allow.admits_host(host):
            for parsed in targets.values():
                problem = None if self.allow.admits_address(parsed) else address_problem(parsed)
                if problem:
                    inner = _ipv4_inside(parsed)
                    shown = f"{parsed} (IPv4 {inner})" if inner != parsed else str(parsed)
                    raise RowError(
                        "blocked_address",
                        f"host {host!r} resolves to {shown}, {problem}; fetching from it is refused "
                        "(list the host or its network in [fetch] allow_hosts if it is trusted)",
                    )
        return list(targets)


def _connect_checked(conn: HTTPConnection, guard: AddressGuard) -> socket.socket:
    """HTTPConnection._new_conn, with the host resolved and checked by `guard` and the socket opened to a checked
    address; errors are urllib3's, as its own _new_conn raises them."""
    try:
        targets = guard.addresses(conn._dns_host, conn.port)
    except socket.gaierror as e:
        raise NameResolutionError(conn.host, conn, e) from e
    error: Exception | None = None
    timeout = conn.timeout
    if (attempt := deadline.current()) is not None and isinstance(timeout, (int, float)):
        # The attempt's waiter reports its deadline; this ends the abandoned connect soon after, not timeout_s later.
        timeout = max(0.01, min(timeout, attempt.remaining() + 1.0))
    for target in targets:  # each checked address in turn, as socket.create_connection tries each of an answer
        try:
            sock = create_connection(
                (target, conn.port), timeout, source_address=conn.source_address, socket_options=conn.socket_options
            )
        except TimeoutError:
            error = ConnectTimeoutError(
                conn, f"Connection to {conn.host} ({target}) timed out. (connect timeout={conn.timeout})"
            )
        except OSError as e:
            error = NewConnectionError(conn, f"Failed to establish a new connection to {target}: {e}")
        else:
            sys.audit("http.client.connect", conn, conn.host, conn.port)
            return sock
    raise error or NewConnectionError(conn, f"no address for {conn.host}")


class _GuardedHTTPConnection(HTTPConnection):
    guard: AddressGuard  # set on the subclass guarded_pool_manager makes

    def _new_conn(self) -> socket.socket:
        return _connect_checked(self, self.guard)

    def request(self, *args, **kwargs) -> None:
        deadline.hold(self)  # the attempt's deadline shuts this connection's socket: headers and body are bounded
        super().request(*args, **kwargs)


class _GuardedHTTPSConnection(HTTPSConnection):
    guard: AddressGuard

    def _new_conn(self) -> socket.socket:
        return _connect_checked(self, self.guard)  # TLS is wrapped around it by connect(), for self.host

    def request(self, *args, **kwargs) -> None:
        deadline.hold(self)
        super().request(*args, **kwargs)


class _ReleasingPool(HTTPConnectionPool):
    """A connection pool mixin: a connection going back to the pool leaves its attempt first, so that attempt's
    deadline cannot shut it while another attempt uses it."""

    def _put_conn(self, conn) -> None:
        deadline.release(conn)
        super()._put_conn(conn)


def guarded_pool_manager(guard: AddressGuard, **pool_kwargs) -> urllib3.PoolManager:
    """A urllib3.PoolManager (with `pool_kwargs`) each of whose new connections goes through `guard`."""
    http = type("GuardedHTTPConnection", (_GuardedHTTPConnection,), {"guard": guard})
    https = type("GuardedHTTPSConnection", (_GuardedHTTPSConnection,), {"guard": guard})
    manager = urllib3.PoolManager(**pool_kwargs)
    manager.pool_classes_by_scheme = {
        "http": type("GuardedHTTPConnectionPool", (_ReleasingPool, HTTPConnectionPool), {"ConnectionCls": http}),
        "https": type("GuardedHTTPSConnectionPool", (_ReleasingPool, HTTPSConnectionPool), {"ConnectionCls": https}),
    }
    return manager


@dataclass(frozen=True)
class LocalPath:
    """A local file to read: `path` as the reference names it, `ref` the reference itself (for messages)."""

    path: str
    ref: str


class LocalRoots:
    """The folders local files may be read from."""

    def __init__(self, roots: Iterable[str]) -> None:
        self.roots = tuple(os.path.realpath(root) for root in roots)

    def resolve(self, path: str, ref: str) -> str:
        """The real path of `path` (symlinks and ".." resolved) when it lies inside a root and is a regular file.

        RowError naming `ref`, the image reference `path` came from (redacted): "blocked_address" outside the roots
        (checked first, so a refused path does not tell whether it exists), "invalid_input" for a missing path or
        anything but a regular file: a FIFO or a device would block the reader, so it is refused before opening.
        The reference is redacted for a message only (a local path is read often, a message written rarely)."""
        if not self.roots:
            raise RowError(
                "blocked_address",
                f"local file {redact(ref)!r} refused: no [fetch] local_roots are set, so no "
                "local files may be read (list the folders images may come from)",
            )
        if "\0" in path:  # os.path.realpath would raise ValueError
            raise RowError("invalid_input", f"malformed local path {redact(ref)!r}: it contains a NUL byte")
        try:
            real = os.path.realpath(path)
        except OSError:  # a link on the path replaced while realpath read it (readlink: EINVAL), a loop
            raise RowError(
                "blocked_address", f"local file {redact(ref)!r} refused: its path changed while it was being resolved"
            ) from None
        if self.root_of(real) is None:
            shown = redact(ref)
            where = shown if real in (ref, path) else f"{shown} (resolves to {redact(real)})"
            raise RowError(
                "blocked_address", f"local file {where} is outside [fetch] local_roots ({', '.join(self.roots)})"
            )
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            raise RowError("invalid_input", f"no such file or object: {redact(ref)}") from None
        except OSError as err:
            raise RowError("invalid_input", f"cannot read {redact(ref)}: {err.strerror}") from None
        if not stat.S_ISREG(mode):
            raise _not_a_file(redact(ref), mode)
        return real

    def root_of(self, real: str) -> str | None:
        """The root that the real (resolved, normalized) path `real` lies in, if any."""
        return next((root for root in self.roots if lies_in(real, root)), None)

    def open(self, target: LocalPath) -> BinaryIO:
        """`target` resolved and checked by `resolve`, then opened without following any link: from its root's
        folder, one component at a time with O_NOFOLLOW, so a folder on the checked path swapped for a symlink (or
        the file for a FIFO) after the check is refused, never followed out of the root. The opened file is checked
        to be a regular file (fstat), and opened non-blocking so that a FIFO swapped in cannot block the open."""
        real = self.resolve(target.path, target.ref)
        root = cast(str, self.root_of(real))  # resolve refused a path outside every root
        parts = os.path.relpath(real, root).split(os.sep)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for folder in parts[:-1]:
                inner = os.open(folder, _FOLDER_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = inner
            file_fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                raise RowError(
                    "blocked_address",
                    f"local file {redact(target.ref)!r} refused: its path was changed to go "
                    "through a symbolic link after it was checked",
                ) from None
            raise
        finally:
            os.close(fd)
        mode = os.fstat(file_fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(file_fd)
            raise _not_a_file(redact(target.ref), mode)
        os.set_blocking(file_fd, True)
        return os.fdopen(file_fd, "rb")


# O_NOFOLLOW: a symlink in place of a component fails (ELOOP, or ENOTDIR for a folder) instead of being followed.
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _not_a_file(shown: str, mode: int) -> RowError:
    return RowError("invalid_input", f"not a file: {shown} is {file_kind(mode)}; only regular files are read")


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages: "a directory", "a named pipe (FIFO)", ..."""
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def lies_in(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it; both absolute and normalized (os.path.realpath's). A prefix test:
    os.path.commonpath did the same at several times the cost, on every local read."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _home_folders() -> set[str]:
    homes = {os.path.realpath(os.path.expanduser("~")), "/root"}
    for parent in ("/home", "/Users"):
        try:
            homes.update(os.path.realpath(os.path.join(parent, name)) for name in os.listdir(parent))
        except OSError:
            continue  # no such folder on this system
    return homes


def risky_local_roots(roots: Iterable[str]) -> list[str]:
    """A warning for each local root that opens far more than image folders: "/" or a folder holding, or being, a
    home folder (SSH keys, cloud credentials, shell history). For the run summary; the roots are still used."""
    homes = _home_folders()
    warnings = []
    for root in roots:
        real = os.path.realpath(root)
        if real == os.path.sep:
            why = "is the whole file system"
        elif real in homes:
            why = "is a home folder"
        elif any(lies_in(home, real) for home in homes):
            why = "holds home folders"
        else:
            continue
        warnings.append(
            f"[fetch] local_roots entry {root!r} {why}: any row of the input can read any file in it "
            "(SSH keys, cloud credentials); list only the folders that hold the images"
        )
    return warnings
