"""Fetching a query image from a client's URL (POST /match {"url": ...}) without becoming a proxy into our network.

Off unless URL_FETCH=1. Only http(s); the host name is resolved here and every address it resolves to is checked
(loopback, private, link-local, shared, multicast and reserved addresses are refused; ``allow_networks`` lets named
networks through, for internal image hosts and tests), then the connection goes to that checked address, so a
second DNS answer cannot swap it (DNS rebinding). Redirects are followed by hand, at most ``MAX_REDIRECTS``, each
hop checked the same way. The body is capped while it streams, the whole fetch has a deadline, and decoding applies
the service's pixel cap.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3

from core.http import BodyTooLarge, BodyTooSlow, iter_raw_body

from .problems import BadRequest, Forbidden, UpstreamFailed

MAX_REDIRECTS = 3
MAX_URL_CHARS = 2048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# IPv6 addresses that reach the IPv4 address in their last 32 bits: NAT64's well-known prefix (RFC 6052: a
# DNS64/NAT64 network translates 64:ff9b::a9fe:a9fe to 169.254.169.254), and IPv4-compatible ones
EMBEDS_IPV4 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::/96"))
LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a network's own translators, any prefix length


def public_only(allow_networks: list[str] | tuple[str, ...] = ()) -> Callable[[IPAddress], bool]:
    """The address policy: global unicast addresses, plus any in ``allow_networks``; an IPv6 address that embeds an
    IPv4 one (mapped, NAT64, 6to4, IPv4-compatible) is judged by that IPv4 address."""
    allowed = [ipaddress.ip_network(n, strict=False) for n in allow_networks]

    def allow(ip: IPAddress) -> bool:
        if any(ip in net for net in allowed):
            return True
        if isinstance(ip, ipaddress.IPv6Address):
            if ip in LOCAL_NAT64:
                return False
            if ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            elif ip.sixtofour is not None:
                ip = ip.sixtofour
            elif any(ip in net for net in EMBEDS_IPV4):
                ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        return any(ip in net for net in allowed) or (ip.is_global and not ip.is_multicast)

    return allow


class UrlFetcher:
    def __init__(self, timeout_s: float, max_bytes: int, allow_address: Callable[[IPAddress], bool]) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.allow_address = allow_address

    def fetch(self, url: str) -> bytes:
        """The body at ``url`` (after at most MAX_REDIRECTS checked redirects); a problem otherwise."""
        deadline = time.monotonic() + self.timeout_s
        for _ in range(MAX_REDIRECTS + 1):
            pool, response = self._get(url, deadline)
            try:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location")
                    if not location:
                        raise UpstreamFailed("url_fetch_failed", f"{url} redirected with no Location")
                    url = urljoin(url, location)
                    continue
                if response.status != 200:
                    raise UpstreamFailed("url_fetch_failed", f"{url} answered HTTP {response.status}")
                return self._read(response, url, deadline)
            finally:
                response.release_conn()
                pool.close()
        raise UpstreamFailed("url_fetch_failed", f"more than {MAX_REDIRECTS} redirects")

    def _target(self, url: str) -> tuple[str, str, int, str]:
        if len(url) > MAX_URL_CHARS:
            raise BadRequest("bad_url", f"url: at most {MAX_URL_CHARS} characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise BadRequest("bad_url", f"url: not a URL: {url[:80]!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest("bad_url", f"url: only http(s) URLs with a host are fetched, got {url[:80]!r}")
        if parts.username or parts.password:
            raise BadRequest("bad_url", "url: credentials in URLs are not accepted")
        port = port or (443 if parts.scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.hostname
        if not host.isascii():  # an internationalised name: its ASCII form, which DNS, Host and TLS use
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise BadRequest("bad_url", f"url: not a valid host name: {host[:80]!r}") from None
        return parts.scheme, host, port, path

    def _resolve(self, host: str, port: int) -> str:
        """The first address of ``host`` the policy allows; refused if any address is not allowed."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise UpstreamFailed("url_fetch_failed", f"cannot resolve {host[:80]!r}") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        refused = [a for a in addresses if not self.allow_address(a)]
        if refused:
            raise Forbidden("url_not_allowed", f"{host[:80]} resolves to {refused[0]}, which is not a public address")
        return str(addresses[0])

    def _get(self, url: str, deadline: float) -> tuple[urllib3.HTTPConnectionPool, urllib3.BaseHTTPResponse]:
        scheme, host, port, path = self._target(url)
        ip = self._resolve(host, port)
        left = max(0.05, deadline - time.monotonic())
        timeout = urllib3.Timeout(connect=left, read=left)
        if scheme == "https":
            pool = urllib3.HTTPSConnectionPool(
                ip,
                port,
                server_hostname=host,
                assert_hostname=host,
                cert_reqs="CERT_REQUIRED",
                ca_certs=certifi.where(),
                timeout=timeout,
                retries=False,
                maxsize=1,
            )
        else:
            pool = urllib3.HTTPConnectionPool(ip, port, timeout=timeout, retries=False, maxsize=1)
        literal = f"[{host}]" if ":" in host else host  # an IPv6 literal is bracketed in Host (RFC 3986)
        host_header = literal if port in (80, 443) else f"{literal}:{port}"
        try:
            return pool, pool.urlopen(
                "GET",
                path,
                headers={"Host": host_header, "Accept": "image/*"},
                redirect=False,
                preload_content=False,
                retries=False,
                assert_same_host=False,
            )
        except urllib3.exceptions.HTTPError as e:
            pool.close()
            raise UpstreamFailed("url_fetch_failed", f"could not fetch {url[:200]}: {type(e).__name__}") from None

    def _read(self, response: urllib3.BaseHTTPResponse, url: str, deadline: float) -> bytes:
        try:
            return b"".join(iter_raw_body(response, max_bytes=self.max_bytes, deadline=deadline, decode_content=False))
        except BodyTooLarge:
            too_large = f"the image at the URL is larger than {self.max_bytes} bytes"
            raise UpstreamFailed("url_too_large", too_large) from None
        except BodyTooSlow:
            raise UpstreamFailed("url_fetch_timeout", f"fetching the URL took over {self.timeout_s:g} s") from None
        except urllib3.exceptions.HTTPError as e:
            raise UpstreamFailed("url_fetch_failed", f"could not read {url[:200]}: {type(e).__name__}") from None
