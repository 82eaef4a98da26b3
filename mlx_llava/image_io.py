"""Reading pictures: files, http(s) downloads and decoding, each bounded.

A download has one deadline and a byte cap, a picture a pixel cap checked before decoding. For a
server (`FetchPolicy(public_only=True, uniform_errors=True)`) a download is also safe from
server-side request forgery: the host is resolved once, every address it resolves to must be
public, the connection goes to that checked address (no second lookup), every redirect is
checked the same way, and every failure to reach the picture reads the same to the client.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Image.Image | str | Path
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_FETCH_TIMEOUT = 60.0  # seconds for a whole download
DEFAULT_MAX_IMAGE_BYTES = 50_000_000
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS
READ_CHUNK = 1 << 16
MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)
UNREACHABLE = "not reachable or not allowed"

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address in the low 32 bits
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d
# IANA's not globally reachable blocks that older Pythons' `is_global` misses.
_NOT_GLOBAL = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.0.0/24", "64:ff9b:1::/48", "3fff::/20", "5f00::/16", "fec0::/10")
)


class ImageLoadError(ValueError):
    """An image that cannot be fetched, read or decoded."""


class ImageFetchError(ImageLoadError):
    """A URL that could not be fetched: `detail` says why, even where the message does not."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


class _Unreachable(Exception):
    """Why a URL could not be reached (refused by policy, network or HTTP failure)."""


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImageLoadError(f"{name} must be a number, got '{value}'") from None
    if number <= 0:
        raise ImageLoadError(f"{name} must be positive, got '{value}'")
    return number


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on reading one picture.

    Attributes:
        timeout: seconds for a whole http(s) download, connections and redirects included
            (MLX_LLAVA_FETCH_TIMEOUT, default 60).
        max_bytes: the largest download (MLX_LLAVA_MAX_IMAGE_MB, default 50 MB).
        max_pixels: the largest picture, width x height, checked before decoding so that a
            small file cannot unpack into gigabytes (MLX_LLAVA_MAX_IMAGE_PIXELS, default
            Pillow's decompression-bomb limit of 89,478,485).
    """

    timeout: float = DEFAULT_FETCH_TIMEOUT
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def from_env(cls, **overrides) -> "FetchLimits":
        """The limits the environment sets, then `overrides` that are not None."""
        limits = cls(
            timeout=_env_number("MLX_LLAVA_FETCH_TIMEOUT", DEFAULT_FETCH_TIMEOUT),
            max_bytes=int(
                _env_number("MLX_LLAVA_MAX_IMAGE_MB", DEFAULT_MAX_IMAGE_BYTES / 1e6) * 1e6
            ),
            max_pixels=int(_env_number("MLX_LLAVA_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)),
        )
        return replace(limits, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class FetchPolicy:
    """Which hosts a download may reach, and what its errors say.

    The defaults suit a command line fetching for its own user; a server fetching what a client
    names wants `public_only=True, uniform_errors=True`.

    Attributes:
        public_only: refuse hosts that resolve to any loopback, private, link-local, multicast,
            reserved, unspecified or otherwise non-global address (IPv4-mapped, IPv4-compatible,
            6to4 and NAT64 IPv6 addresses are judged by the IPv4 address they hold).
        uniform_errors: one message for every failure to reach the picture (refused by policy,
            DNS, refused or reset connections, timeouts, HTTP errors, redirects), so that a
            client learns nothing of the network; `ImageFetchError.detail` keeps the reason.
            Size caps and "not an image" are still stated.
    """

    public_only: bool = False
    uniform_errors: bool = False


def is_public_address(ip: IPAddress) -> bool:
    """Whether `ip` is a globally routable unicast address (an IPv6 address that embeds an
    IPv4 address is judged by that address)."""
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip in _IPV4_COMPATIBLE:  # ::a.b.c.d, and :: and ::1
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            return is_public_address(ip.sixtofour)
        if ip in _NAT64:
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if any(ip in network for network in _NOT_GLOBAL):
        return False
    return ip.is_global and not (
        ip.is_multicast
        or ip.is_private
        or ip.is_reserved
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_unspecified
    )


def _size(n: int) -> str:
    return f"{n / 1e6:g} MB" if n >= 1e6 else f"{n} bytes"


class _Deadline:
    """One deadline for a whole download, redirects included: each socket operation waits at
    most the time left, and at the deadline the socket in use is shut down (a server that
    sends its headers a byte at a time would outlast any per-read timeout). A context manager:
    the watch starts on entering."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.sock: Optional[socket.socket] = None
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.passed()
        return left

    def passed(self) -> "_Unreachable":
        return _Unreachable(f"took longer than {self.seconds:g} s")

    def watch(self, sock: socket.socket) -> None:
        """Shut `sock` down at the deadline."""
        self.sock = sock

    def _expire(self) -> None:
        if self.sock is not None:
            try:  # socket's own shutdown, under TLS too: the reader then sees the end
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
            except OSError:
                pass


def _lookup(host: str, port: int, deadline: _Deadline) -> list[tuple]:
    """`getaddrinfo`'s TCP addresses of `host`, within the deadline. The C lookup cannot be
    interrupted, so it runs in a daemon thread that a slow resolver is left to finish alone."""
    answer: list = []

    def look() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as e:  # noqa: BLE001 - handed to the caller
            answer.append(e)

    lookup = threading.Thread(target=look, name="mlx-llava-dns", daemon=True)
    lookup.start()
    lookup.join(deadline.left())
    if not answer:
        raise deadline.passed()
    if isinstance(answer[0], (socket.gaierror, UnicodeError)):
        raise _Unreachable(f"cannot resolve {host}: {answer[0]}")
    if isinstance(answer[0], Exception):
        raise answer[0]
    return answer[0]


def _resolve(host: str, port: int, policy: FetchPolicy, deadline: _Deadline) -> list[tuple]:
    """The TCP addresses of `host` (looked up within the deadline), every one of them checked
    under `policy`."""
    addresses = _lookup(host, port, deadline)
    if not addresses:
        raise _Unreachable(f"{host} has no address")
    if policy.public_only:
        for *_, sockaddr in addresses:
            try:
                ip = ipaddress.ip_address(sockaddr[0])
            except ValueError:
                raise _Unreachable(f"{host} resolves to {sockaddr[0]!r}, not an IP") from None
            if not is_public_address(ip):
                raise _Unreachable(f"{host} resolves to {ip}, not a public address")
    return addresses


def _connect(addresses: list[tuple], deadline: _Deadline) -> socket.socket:
    """A TCP connection to the first of the resolved `addresses` that answers."""
    errors = []
    for family, kind, proto, _, sockaddr in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            deadline.watch(sock)
            sock.settimeout(deadline.left())
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            errors.append(f"{sockaddr[0]} port {sockaddr[1]}: {e}")
        except BaseException:
            sock.close()
            raise
    if time.monotonic() >= deadline.end:
        raise deadline.passed()
    raise _Unreachable("; ".join(errors))


class _CheckedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to addresses resolved (and checked) beforehand: `host` is only the
    name sent in the Host header, never looked up again."""

    def __init__(self, host: str, port: int, addresses: list[tuple], deadline: _Deadline):
        super().__init__(host, port, timeout=deadline.left())
        self.addresses, self.deadline = addresses, deadline

    def connect(self) -> None:
        self.sock = _connect(self.addresses, self.deadline)


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    """`_CheckedHTTPConnection` over TLS: the certificate is verified for `host`, which is also
    the SNI name."""

    def __init__(self, host: str, port: int, addresses: list[tuple], deadline: _Deadline):
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=deadline.left(), context=self.tls)
        self.addresses, self.deadline = addresses, deadline

    def connect(self) -> None:
        sock = _connect(self.addresses, self.deadline)
        try:
            sock.settimeout(self.deadline.left())
            self.sock = self.tls.wrap_socket(
                sock, server_hostname=self.host, do_handshake_on_connect=False
            )
        except BaseException:
            sock.close()
            raise
        self.deadline.watch(self.sock)
        self.sock.do_handshake()


def _download(url: str, limits: FetchLimits, policy: FetchPolicy) -> bytes:
    """The body at `url`, redirects followed (each one checked), within `limits`.

    Raises:
        _Unreachable: refused by `policy`, a network or HTTP failure, too many redirects.
        ImageLoadError: over the byte cap.
    """
    with _Deadline(limits.timeout) as deadline:
        for _ in range(MAX_REDIRECTS + 1):
            body, url = _get(url, limits, policy, deadline)
            if body is not None:
                return body
    raise _Unreachable(f"more than {MAX_REDIRECTS} redirects")


def _get(
    url: str, limits: FetchLimits, policy: FetchPolicy, deadline: _Deadline
) -> tuple[Optional[bytes], str]:
    """One GET of `url`: (its body, `url`), or (None, where it redirects to)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise _Unreachable(f"redirected to a {parts.scheme or 'relative'} URL, not http(s)")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise _Unreachable(f"bad URL {url}: {e}") from None
    if not host:
        raise _Unreachable(f"no host in {url}")
    https = parts.scheme == "https"
    port = port or (443 if https else 80)
    addresses = _resolve(host, port, policy, deadline)
    kind = _CheckedHTTPSConnection if https else _CheckedHTTPConnection
    conn = kind(host, port, addresses, deadline)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", target, headers={"User-Agent": "mlx-llava", "Accept": "image/*"})
        sock = conn.sock  # the response may take it over from `conn`
        sock.settimeout(deadline.left())
        with conn.getresponse() as response:
            location = response.getheader("Location")
            if response.status in REDIRECTS and location:
                return None, urllib.parse.urljoin(url, location.strip())
            if not 200 <= response.status < 300:
                raise _Unreachable(f"HTTP Error {response.status}: {response.reason}")
            return _read_body(response, sock, limits, deadline), url
    except (OSError, http.client.HTTPException) as e:
        if isinstance(e, TimeoutError) or time.monotonic() >= deadline.end:
            raise deadline.passed() from None
        if isinstance(e, OSError):
            raise _Unreachable(str(e) or type(e).__name__) from None
        # Not HTTP, or broken HTTP: the name says more than the text.
        raise _Unreachable(f"{type(e).__name__}: {e!s:.200}".strip()) from None
    finally:
        conn.close()


def _read_body(
    response: http.client.HTTPResponse,
    sock: socket.socket,
    limits: FetchLimits,
    deadline: _Deadline,
) -> bytes:
    """The response's body, at most `limits.max_bytes` bytes, each read within the deadline."""
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > limits.max_bytes:
        raise ImageLoadError(
            f"{_size(int(declared))}, more than the limit of {_size(limits.max_bytes)}"
        )
    chunks, total = [], 0
    while True:
        sock.settimeout(deadline.left())  # each read waits at most until the deadline
        chunk = response.read1(READ_CHUNK)
        if not chunk:
            deadline.left()  # the end, or the deadline's shutdown
            return b"".join(chunks)
        total += len(chunk)
        if total > limits.max_bytes:
            raise ImageLoadError(f"more than the limit of {_size(limits.max_bytes)}")
        chunks.append(chunk)


def fetch(url: str, limits: FetchLimits, policy: Optional[FetchPolicy] = None) -> bytes:
    """Download `url` within `limits` (one deadline for the whole download, redirects
    included; at most `limits.max_bytes` bytes), reaching only the hosts `policy` allows.

    Raises:
        ImageFetchError: the URL cannot be reached or is refused (with `policy.uniform_errors`
            every such error has the same message; `detail` says why).
        ImageLoadError: the download is over the byte cap.
    """
    policy = policy or FetchPolicy()
    prefix = f"cannot fetch image URL '{url}': "
    try:
        return _download(url, limits, policy)
    except _Unreachable as e:
        detail = str(e)
        message = prefix + (UNREACHABLE if policy.uniform_errors else detail)
        raise ImageFetchError(message, detail) from None
    except ImageLoadError as e:
        raise ImageLoadError(prefix + str(e)) from None


def _read_error(name: str, e: Exception) -> ImageLoadError:
    if isinstance(e, FileNotFoundError):
        reason = "file not found"
    elif isinstance(e, IsADirectoryError):
        reason = "is a directory"
    elif isinstance(e, PermissionError):
        reason = "permission denied"
    elif isinstance(e, UnidentifiedImageError):
        reason = "not an image"
    else:
        reason = f"invalid image data ({e})"
    return ImageLoadError(f"cannot read image '{name}': {reason}")


def load_image(
    source: ImageSource,
    timeout: float | None = None,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
    policy: Optional[FetchPolicy] = None,
) -> Image.Image:
    """Load an image from a PIL image, a file path or an http(s) URL.

    Files and URLs are fully decoded and turned upright by their EXIF orientation; a PIL
    image is returned as is. The mode is kept: convert with `to_rgb`.

    Args:
        source: a PIL image, a path, or an http(s) URL.
        timeout, max_bytes, max_pixels: the bounds of `FetchLimits` (None: the environment's,
            else the defaults: 60 s and 50 MB for a download, Pillow's pixel limit).
        policy: the hosts a URL may reach and what errors say (None: any host, detailed
            errors, as a command line wants).

    Raises:
        ImageLoadError: the source cannot be fetched, read or decoded, or is over a bound.
    """
    if isinstance(source, Image.Image):
        return source
    limits = FetchLimits.from_env(timeout=timeout, max_bytes=max_bytes, max_pixels=max_pixels)
    name = str(source)
    if name.startswith(("http://", "https://")):
        data = fetch(name, limits, policy)
    else:
        try:
            data = Path(name).read_bytes()
        except OSError as e:
            raise _read_error(name, e) from e
    return decode_image(data, name, limits.max_pixels)


def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an encoded picture (PNG, JPEG, ...) whose size is at most `max_pixels`.

    Raises:
        ImageLoadError: not a picture, damaged, or larger than `max_pixels` (`name` says which).
    """
    try:
        img = Image.open(BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _bomb_error(name, str(e), max_pixels) from None
    except Exception as e:  # PIL raises many types: OSError, SyntaxError, ...
        raise _read_error(name, e) from e
    width, height = img.size
    if width * height > max_pixels:
        raise _bomb_error(name, f"{width} x {height} pixels", max_pixels)
    try:
        img.load()
        return ImageOps.exif_transpose(img)
    # PIL raises many types here: OSError, SyntaxError, zlib.error, struct.error...
    except Exception as e:
        raise _read_error(name, e) from e


def _bomb_error(name: str, size: str, max_pixels: int) -> ImageLoadError:
    return ImageLoadError(
        f"cannot read image '{name}': {size} is more than the limit of {max_pixels:,} pixels "
        "(a decompression bomb?)"
    )
