"""Which image sources an untrusted manifest may name, checked before anything is read.

Manifests come from other teams and from vendors. An image URI is read only when it lies
under an allowed root: the manifest's own folder tree, or a prefix of
``storage.allowed_sources`` (object-store buckets, extra local folders, http(s) hosts, whole
schemes). The check is on the URI's text alone, so a refused URI is never touched: no stat,
no read, and the errors manifest says "refused by policy" whether or not the target exists.

Local paths are compared after ``..`` is collapsed and again after symlinks are resolved (a
link inside the tree that points outside is refused). http(s), when allowed, is fetched here
rather than through fsspec: every address the host resolves to must be public (not
loopback, link-local such as the 169.254.169.254 metadata service, private, shared, reserved
or multicast, unless listed in ``storage.http.allowed_networks``); the connection goes to the
address that was checked (no second DNS answer), redirects are followed by hand, each one
checked like the first URI, never to another scheme family or from https down to http, with
timeouts and a maximum size.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import posixpath
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

if TYPE_CHECKING:
    from ray_app.config import HttpSourcesConfig, StorageConfig

REFUSED = "refused by policy"
LOCAL_SCHEMES = ("file", "local")
HTTP_SCHEMES = ("http", "https")
REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16
# NAT64 addresses embed an IPv4 address that a gateway would reach for us.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

Resolver = Callable[[str, int], list[str]]


class SourceRefused(PermissionError):
    """A URI that the policy refuses; the message starts with "refused by policy"."""

    def __init__(self, uri: str, why: str):
        super().__init__(f"{REFUSED}: {why}")
        self.uri = uri


def check_allowed_source(entry: str) -> str:
    """Validate one ``storage.allowed_sources`` entry -> its canonical prefix, or raise
    ``ValueError`` naming the entry and the fix."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"allowed_sources entry {entry!r} is empty: give a URI prefix")
    if "::" in entry:
        raise ValueError(
            f"allowed_sources entry {entry!r}: chained fsspec URLs are not allowed; name the "
            "underlying store, e.g. s3://bucket"
        )
    scheme, sep, rest = entry.partition("://")
    if not sep:
        if not entry.startswith("/"):
            raise ValueError(
                f"allowed_sources entry {entry!r} is neither a URI (scheme://...) nor an "
                "absolute local folder: write it as /abs/folder or s3://bucket/prefix"
            )
        return os.path.normpath(entry)
    if not scheme.isascii() or not scheme.replace("+", "").replace("-", "").isalnum():
        raise ValueError(f"allowed_sources entry {entry!r}: {scheme!r} is not a URI scheme")
    scheme = scheme.lower()
    if ".." in rest.split("/"):
        raise ValueError(f"allowed_sources entry {entry!r}: '..' is not allowed in a prefix")
    if scheme in LOCAL_SCHEMES:
        if not rest.startswith("/"):
            raise ValueError(
                f"allowed_sources entry {entry!r}: a {scheme}:// prefix needs an absolute path, "
                "e.g. file:///data/photos"
            )
        return os.path.normpath(rest)
    if scheme in HTTP_SCHEMES and rest:
        parts = urlsplit(entry)
        if not parts.hostname or "@" in parts.netloc:
            raise ValueError(
                f"allowed_sources entry {entry!r}: give a host, e.g. https://cdn.example.com"
            )
        host, _, path = rest.partition("/")
        rest = f"{host.lower()}/{path}"  # host names are case-insensitive; URIs are lowered too
    return f"{scheme}://{rest.rstrip('/')}" if rest.strip("/") else f"{scheme}://"


def _under(path: str, root: str) -> bool:
    """``path`` is ``root`` or inside it, on segment boundaries (``/a/b`` is not under ``/a/bc``)."""
    if root.endswith("://"):
        return path.startswith(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class HttpOptions:
    timeout_s: float = 10.0
    deadline_s: float = 60.0
    max_bytes: int = 64 * 2**20
    max_redirects: int = 3
    allowed_networks: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: HttpSourcesConfig) -> HttpOptions:
        return cls(
            cfg.timeout_s, cfg.deadline_s, cfg.max_bytes, cfg.max_redirects,
            tuple(cfg.allowed_networks),
        )  # fmt: skip


@dataclass(frozen=True)
class SourcePolicy:
    """Allowed roots (local absolute folders, or ``scheme://prefix``) and how http is read.

    Picklable: the driver builds it once and every Ray task checks its own reads with it.
    """

    roots: tuple[str, ...]
    http: HttpOptions = field(default_factory=HttpOptions)

    @classmethod
    def for_manifest(cls, manifest_uri: str, cfg: StorageConfig | None = None) -> SourcePolicy:
        """The manifest's own folder tree plus ``cfg.allowed_sources``."""
        from ray_app import storage

        folder = storage.parent_uri(storage.normalize_uri(manifest_uri))
        entries = [folder, *(cfg.allowed_sources if cfg else [])]
        roots = []
        for entry in entries:
            root = check_allowed_source(entry)
            roots.append(root)
            if root.startswith("/"):  # a folder reached through a symlink is allowed by both names
                roots.append(os.path.realpath(root))
        http = HttpOptions.from_config(cfg.http) if cfg else HttpOptions()
        return cls(tuple(dict.fromkeys(roots)), http)

    # ------------------------------------------------------------------ checks (no I/O)

    def check(self, uri: str) -> str:
        """The URI to read if ``uri`` is allowed, else ``SourceRefused``. Touches nothing
        except, for local paths already inside an allowed folder, the symlinks on the way."""
        if "::" in uri:
            raise SourceRefused(uri, f"{uri!r} is a chained fsspec URL")
        scheme, sep, rest = uri.partition("://")
        if not sep:
            if not uri.startswith("/"):
                raise SourceRefused(uri, f"{uri!r} is not an absolute path or URI")
            return self._check_local(uri, uri)
        scheme = scheme.lower()
        if scheme in LOCAL_SCHEMES:
            return self._check_local(uri, rest)
        if any(seg in (".", "..") for seg in rest.split("/")[1:]):
            raise SourceRefused(uri, f"{uri!r} has '.' or '..' segments")
        canonical = f"{scheme}://{rest}"
        if scheme in HTTP_SCHEMES:
            canonical = _canonical_http(uri)
        if not any(_under(canonical, r) for r in self.roots if "://" in r):
            raise SourceRefused(uri, self._outside(uri))
        return canonical

    def _check_local(self, uri: str, path: str) -> str:
        if not path.startswith("/"):
            raise SourceRefused(uri, f"{uri!r} is not an absolute path")
        path = os.path.normpath(path)
        local = [r for r in self.roots if r.startswith("/")]
        if not any(_under(path, r) for r in local):
            raise SourceRefused(uri, self._outside(uri))
        real = os.path.realpath(path)  # a symlink inside the tree may point outside it
        if not any(_under(real, r) for r in local):
            raise SourceRefused(uri, f"{uri!r} is a link to a path outside the allowed sources")
        return real

    def _outside(self, uri: str) -> str:
        return (
            f"{uri!r} is outside the manifest's folder and storage.allowed_sources "
            f"({', '.join(self.roots)}); add its prefix there if it is trusted"
        )

    def check_address(self, host: str, port: int, resolve: Resolver | None = None) -> str:
        """Resolve ``host`` and return an address to connect to; ``SourceRefused`` when any
        address it resolves to is not public (an attacker's DNS may mix answers)."""
        try:
            addresses = (resolve or _resolve)(host, port)
        except OSError as exc:
            raise OSError(f"cannot resolve {host!r}: {exc}") from None
        if not addresses:
            raise OSError(f"cannot resolve {host!r}: no address")
        for address in addresses:
            why = address_refusal(address, self.http.allowed_networks)
            if why:
                raise SourceRefused(host, f"{host!r} resolves to {address}, {why}")
        return addresses[0]

    # ------------------------------------------------------------------ reads

    def read(self, uri: str, resolve: Resolver | None = None) -> bytes:
        """Check ``uri``, then read it (http(s) through ``fetch``, others through fsspec)."""
        from ray_app import storage

        target = self.check(uri)
        if target.partition("://")[0] in HTTP_SCHEMES:
            return self.fetch(target, resolve)
        return storage.read_bytes(target)

    def fetch(self, url: str, resolve: Resolver | None = None) -> bytes:
        """GET ``url`` with every hop checked; redirects followed by hand."""
        deadline = time.monotonic() + self.http.deadline_s
        for _hop in range(self.http.max_redirects + 1):
            url = self.check(url)
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = self.check_address(parts.hostname or "", port, resolve)
            conn = _connection(parts.scheme, parts.hostname or "", port, address, self.http)
            try:
                target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                conn.request("GET", target, headers={"Host": parts.netloc, "User-Agent": "restage"})
                resp = conn.getresponse()
                if resp.status in REDIRECTS:
                    location = resp.getheader("Location")
                    if not location:
                        raise OSError(f"HTTP {resp.status} from {url} without a Location")
                    nxt = urljoin(url, location.strip())
                    scheme = nxt.partition("://")[0].lower()
                    if scheme not in HTTP_SCHEMES or (parts.scheme == "https" and scheme == "http"):
                        raise SourceRefused(
                            url, f"{url!r} redirects to {nxt!r} (another scheme, or https->http)"
                        )
                    try:
                        self.check(nxt)
                    except SourceRefused as exc:
                        raise SourceRefused(url, f"{url!r} redirects to {nxt!r}: {exc}") from None
                    url = nxt
                    continue
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status} {resp.reason} from {url}")
                return _read_body(resp, url, self.http.max_bytes, deadline)
            except TimeoutError:
                raise TimeoutError(
                    f"{url}: timed out (storage.http.timeout_s={self.http.timeout_s:g}, "
                    f"deadline_s={self.http.deadline_s:g})"
                ) from None
            finally:
                conn.close()
        raise SourceRefused(url, f"more than {self.http.max_redirects} redirects")


def _canonical_http(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.username is not None or "@" in parts.netloc:
        raise SourceRefused(uri, f"{uri!r} carries credentials")
    if not parts.hostname:
        raise SourceRefused(uri, f"{uri!r} has no host")
    try:
        port = parts.port
    except ValueError:
        raise SourceRefused(uri, f"{uri!r} has an invalid port") from None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    path = posixpath.normpath(parts.path) if parts.path else "/"
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme.lower()}://{netloc}{path}{query}"


def address_refusal(address: str, allowed_networks: tuple[str, ...] = ()) -> str | None:
    """Why a connection to ``address`` is refused (loopback, private, ...), or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if any(ip in ipaddress.ip_network(n, strict=False) for n in allowed_networks):
        return None
    embedded = None
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    for candidate in (embedded, ip):  # the embedded address names the real target
        if candidate is None:
            continue
        for kind, bad in (
            ("a loopback address", candidate.is_loopback),
            ("a link-local address (cloud metadata lives there)", candidate.is_link_local),
            ("an unspecified address", candidate.is_unspecified),
            ("a multicast address", candidate.is_multicast),
            ("a private address", candidate.is_private),
            ("a reserved address", candidate.is_reserved),
            ("not a public address", not candidate.is_global),
        ):
            if bad:
                return kind
    return None


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to an address that was checked, with the URL's Host header."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address; the certificate is still verified against the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _connection(
    scheme: str, host: str, port: int, address: str, opts: HttpOptions
) -> http.client.HTTPConnection:
    cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    return cls(host, port, address, opts.timeout_s)


def _read_body(resp: http.client.HTTPResponse, url: str, max_bytes: int, deadline: float) -> bytes:
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise OSError(
            f"{url}: response is {int(length)} bytes, above storage.http.max_bytes={max_bytes}"
        )
    chunks, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(url)
        chunk = resp.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise OSError(f"{url}: response is above storage.http.max_bytes={max_bytes} bytes")
        chunks.append(chunk)
