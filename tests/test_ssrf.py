"""Remote pictures without server-side request forgery: a server fetches only from public
addresses, checks the address it connects to (no second DNS lookup), re-checks every redirect
(at most 3, one deadline for all), and answers every failure to reach a picture the same way;
the command line fetches from anywhere and says what went wrong.

Only 127.0.0.1 and ::1 are ever connected to: `socket.socket.connect` is replaced by a fake that
records every address, passes loopback through, sends the "public" test addresses to a local
server and refuses everything else. Every server loop is bounded.
"""

from __future__ import annotations

import http.server
import io
import ipaddress
import logging
import socket
import ssl
import threading
import urllib.parse
from pathlib import Path

import httpx
import pytest
from PIL import Image

from llava_testing.serving import free_port, serving, user
from mlx_llava import load
from mlx_llava.cli import generate as generate_cli
from mlx_llava.cli import server as server_cli
from mlx_llava.image_io import (
    UNREACHABLE,
    FetchPolicy,
    ImageFetchError,
    is_public_address,
    load_image,
)
from mlx_llava.server.messages import ImagePolicy
from mlx_llava.server.schemas import RequestError

SERVER = FetchPolicy(public_only=True, uniform_errors=True)  # what the server uses
LOCAL_TRUSTED = FetchPolicy(public_only=False, uniform_errors=True)  # --allow-private-image-hosts
PUBLIC_IP = "93.184.216.34"  # a global address, never really connected to (see `Network`)
PUBLIC_IP_2 = "93.184.216.35"
HF_HUB = Path(__file__).parent / "fixtures" / "data" / "hf-hub"
WAIT_S = 10.0  # the longest any test waits for an event


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 9), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


class PictureHost(http.server.BaseHTTPRequestHandler):
    """/ok: a PNG; /to?url=U: a 302 to U; /chain/N: N redirects, then the PNG; /slow/N: N
    redirects each answered `slow_s` late; anything else 404. Records (path, Host header)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.seen.append((self.path, self.headers.get("Host")))
        parts = urllib.parse.urlsplit(self.path)
        if parts.path.startswith("/slow/"):
            self.server.stop.wait(self.server.slow_s)  # a server that takes its time
        if parts.path == "/ok":
            body = png_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif parts.path == "/to":
            self._redirect(urllib.parse.parse_qs(parts.query)["url"][0])
        elif parts.path.startswith(("/chain/", "/slow/")):
            kind, n = parts.path.split("/")[1:]
            self._redirect(f"/{kind}/{int(n) - 1}" if int(n) > 1 else "/ok")
        else:
            self.send_error(404)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def host():
    """A picture host on 127.0.0.1; `host.url`, `host.port`, `host.seen`."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PictureHost)
    httpd.daemon_threads = True
    httpd.seen, httpd.stop, httpd.slow_s = [], threading.Event(), 0.0
    httpd.port = httpd.server_address[1]
    httpd.url = f"http://127.0.0.1:{httpd.port}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.stop.set()
    httpd.shutdown()
    httpd.server_close()


class Network:
    """Fake DNS and routing: `names` maps a host name to the addresses getaddrinfo answers (a
    list per call, the last one repeated; none: no such name), `routes` maps a (public IP, port)
    to the local port that plays it. Every `connect` is recorded in `connects`; loopback goes
    through, routed addresses go to 127.0.0.1, anything else is refused."""

    def __init__(self, monkeypatch):
        self.names: dict[str, list[list[str]]] = {}
        self.routes: dict[tuple[str, int], int] = {}
        self.lookups: list[str] = []
        self.connects: list[tuple[str, int]] = []
        real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

        def getaddrinfo(name, port, *args, **kwargs):
            if name not in self.names:
                return real_getaddrinfo(name, port, *args, **kwargs)
            self.lookups.append(name)
            answers = self.names[name]
            ips = answers[min(len(self.lookups) - 1, len(answers) - 1)]
            if not ips:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))
                for ip in ips
            ]

        def connect(sock, address):
            ip, port = address[0], address[1]
            self.connects.append((ip, port))
            if (ip, port) in self.routes:
                return real_connect(sock, ("127.0.0.1", self.routes[ip, port]))
            if ip in ("127.0.0.1", "::1"):
                return real_connect(sock, address)
            raise ConnectionRefusedError(111, "refused by the test's network")

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def network(monkeypatch):
    return Network(monkeypatch)


class Listener:
    """A listening socket on 127.0.0.1 that never accepts: a connection would wait in its
    backlog, where `pending()` finds it."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def pending(self) -> bool:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True


@pytest.fixture
def listener():
    listening = Listener()
    yield listening
    listening.sock.close()


# Addresses ----------------------------------------------------------------------------------

PRIVATE_HOSTS = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "0.0.0.0",
    "0",
    "localhost",
    "169.254.169.254",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.0.1",
    "100.64.0.1",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "[::1]",
    "[::]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::ffff:169.254.169.254]",
    "[::127.0.0.1]",
    "[2002:7f00:1::]",
    "[64:ff9b::7f00:1]",
    "[64:ff9b::a9fe:a9fe]",
    "[64:ff9b:1::1]",
    "[fd00::1]",
    "[fe80::1]",
    "[fec0::1]",
    "[ff02::1]",
    "[2001::1]",
]


@pytest.mark.parametrize("name", PRIVATE_HOSTS)
def test_private_addresses_in_every_spelling_are_refused_without_connecting(
    name, network, listener
):
    port = listener.port
    for url in (f"http://{name}:{port}/x.png", f"https://{name}:{port}/x.png"):
        with pytest.raises(ImageFetchError) as e:
            load_image(url, timeout=2, policy=SERVER)
        assert str(e.value) == f"cannot fetch image URL '{url}': {UNREACHABLE}"
        assert "not a public address" in e.value.detail
    assert network.connects == [] and not listener.pending()


@pytest.mark.parametrize(
    "ip, public",
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True),  # NAT64 of a public address
        ("2002:808:808::", True),  # 6to4 of a public address
        ("127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::a00:1", False),
        ("2002:a00:1::", False),
        ("::a00:1", False),
        ("198.18.0.1", False),
        ("192.0.0.8", False),
        ("239.255.255.250", False),
    ],
)
def test_which_addresses_are_public(ip, public):  # IPv6 by the IPv4 address it embeds
    assert is_public_address(ipaddress.ip_address(ip)) is public


def test_a_public_name_that_resolves_to_a_private_address_is_refused(network, listener):
    port = listener.port
    network.names["images.example"] = [[PUBLIC_IP, "127.0.0.1"]]  # one bad address is enough
    with pytest.raises(ImageFetchError, match=UNREACHABLE) as e:
        load_image(f"http://images.example:{port}/x.png", timeout=2, policy=SERVER)
    assert "images.example resolves to 127.0.0.1" in e.value.detail
    assert network.connects == [] and not listener.pending()


def test_the_connection_goes_to_the_address_checked(network, host):
    """DNS rebinding: the name answers a public address, then 127.0.0.1; the one lookup's
    address is the one connected to, and the Host header is still the name."""
    network.names["rebind.example"] = [[PUBLIC_IP], ["127.0.0.1"]]
    network.routes[PUBLIC_IP, 80] = host.port
    img = load_image("http://rebind.example/ok", timeout=5, policy=SERVER)
    assert img.size == (12, 9)
    assert network.lookups == ["rebind.example"]
    assert network.connects == [(PUBLIC_IP, 80)]
    assert host.seen == [("/ok", "rebind.example")]


def test_https_verifies_the_certificate_of_the_name_at_the_address_checked(network, monkeypatch):
    network.names["secure.example"] = [[PUBLIC_IP], ["127.0.0.1"]]
    handshakes = []

    def wrap_socket(context, sock, server_hostname=None, **kwargs):
        handshakes.append((server_hostname, context.verify_mode, context.check_hostname))
        raise ssl.SSLCertVerificationError("certificate verify failed (test)")

    monkeypatch.setattr(ssl.SSLContext, "wrap_socket", wrap_socket)
    monkeypatch.setattr(socket.socket, "connect", _recording_no_op(network))
    with pytest.raises(ImageFetchError, match=UNREACHABLE) as e:
        load_image("https://secure.example/x.png", timeout=5, policy=SERVER)
    assert "certificate verify failed" in e.value.detail
    assert network.connects == [(PUBLIC_IP, 443)]
    assert handshakes == [("secure.example", ssl.CERT_REQUIRED, True)]


def _recording_no_op(network):
    def connect(sock, address):  # records, connects nowhere: the TLS step is faked too
        network.connects.append((address[0], address[1]))

    return connect


@pytest.mark.parametrize(
    "target, allowed_elsewhere",
    [
        ("http://127.0.0.1:{port}/ok", True),
        ("http://localhost:{port}/ok", True),
        ("http://[::ffff:127.0.0.1]:{port}/ok", False),
        ("file:///etc/passwd", False),
        ("ftp://127.0.0.1:{port}/ok", False),
    ],
)
def test_a_redirect_to_a_private_address_is_refused(network, host, target, allowed_elsewhere):
    network.names["public.example"] = [[PUBLIC_IP]]
    network.routes[PUBLIC_IP, 80] = host.port
    target = target.format(port=host.port)
    first = "/to?url=" + urllib.parse.quote(target)
    url = "http://public.example" + first
    with pytest.raises(ImageFetchError, match=UNREACHABLE) as e:
        load_image(url, timeout=5, policy=SERVER)
    assert "not a public address" in e.value.detail or "not http(s)" in e.value.detail
    assert network.connects == [(PUBLIC_IP, 80)]  # the first hop only
    assert host.seen == [(first, "public.example")]
    if allowed_elsewhere:  # the same redirect is followed where private hosts are allowed
        assert load_image(url, timeout=5, policy=LOCAL_TRUSTED).size == (12, 9)


def test_at_most_three_redirects(host):
    assert load_image(f"{host.url}/chain/3", timeout=5).size == (12, 9)
    host.seen.clear()
    with pytest.raises(ImageFetchError, match="more than 3 redirects"):
        load_image(f"{host.url}/chain/4", timeout=5)
    assert [path for path, _ in host.seen] == ["/chain/4", "/chain/3", "/chain/2", "/chain/1"]


def test_one_deadline_for_the_whole_chain_of_redirects(host):
    host.slow_s = 0.4  # each hop in time, the three together not
    with pytest.raises(ImageFetchError, match="took longer than 1 s"):
        load_image(f"{host.url}/slow/3", timeout=1.0)
    paths = [path for path, _ in host.seen]
    assert paths[:2] == ["/slow/3", "/slow/2"] and "/ok" not in paths


# The server's policy ------------------------------------------------------------------------


def test_private_hosts_only_when_the_operator_allows_them(host):
    url = f"{host.url}/ok"
    assert load_image(url, timeout=5, policy=LOCAL_TRUSTED).size == (12, 9)
    trusted = ImagePolicy(allow_remote=True, allow_private_hosts=True, timeout=5)
    assert trusted.load(url, "messages[0]").size == (12, 9)
    with pytest.raises(RequestError, match=UNREACHABLE):
        ImagePolicy(allow_remote=True, timeout=5).load(url, "messages[0]")
    assert len(host.seen) == 2  # the refused one never reached the host


@pytest.fixture(scope="module")
def tiny():
    return load(HF_HUB, dtype="float32")


def test_the_server_flag_reaches_the_picture_policy(tiny, monkeypatch):
    """`server.py --allow-private-image-hosts` -> ServerConfig -> the app's ImagePolicy."""
    import mlx_llava.server

    class Built(Exception):
        pass

    policies, create_app = [], mlx_llava.server.create_app

    def built(model, processor, config):
        policies.append(create_app(model, processor, config).state.service.policy)
        raise Built  # stop before serving

    monkeypatch.setattr(server_cli, "load_from_args", lambda args: tiny)
    monkeypatch.setattr(mlx_llava.server, "create_app", built)
    for flags in ([], ["--allow-private-image-hosts"]):
        args = server_cli.build_parser().parse_args(["--allow-remote-images", *flags])
        with pytest.raises(Built):
            server_cli.serve(args)
    assert [(p.allow_remote, p.allow_private_hosts) for p in policies] == [
        (True, False),
        (True, True),
    ]


@pytest.fixture
def odd_ports():
    """A port that answers like an SSH server (not HTTP), a port that accepts and never
    answers, and a closed port; all on 127.0.0.1, served until the test ends."""
    done = threading.Event()
    banner, silent = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    banner.settimeout(WAIT_S)
    silent.settimeout(WAIT_S)

    def serve_banner():
        try:
            conn, _ = banner.accept()
            with conn:
                conn.recv(65536)  # the request, read so that closing sends no reset
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                conn.shutdown(socket.SHUT_WR)
                conn.recv(65536)  # until the client closes (or WAIT_S)
        except OSError:
            return

    def serve_silence():
        try:
            conn, _ = silent.accept()
        except OSError:
            return
        with conn:
            done.wait(WAIT_S)

    threads = [threading.Thread(target=f, daemon=True) for f in (serve_banner, serve_silence)]
    for t in threads:
        t.start()
    yield {
        "banner": banner.getsockname()[1],
        "silent": silent.getsockname()[1],
        "closed": free_port(),
    }
    done.set()
    banner.close()
    silent.close()
    for t in threads:
        t.join(WAIT_S)


def test_a_client_cannot_tell_refused_closed_open_or_slow_apart(
    tiny, host, network, odd_ports, caplog
):
    """Through a live server: a refused private address, a closed port, an open port that is
    not HTTP, one that never answers, a 404, a redirect loop, a failed DNS lookup: one message."""
    caplog.set_level(logging.INFO, logger="mlx_llava.server")
    ports = {**odd_ports, "web": host.port}
    for i, (name, port) in enumerate(ports.items()):  # public names, played by local ports
        network.names[f"{name}.example"] = [[f"93.184.216.{40 + i}"]]
        network.routes[f"93.184.216.{40 + i}", 80] = port
    urls = {
        "private": f"http://127.0.0.1:{host.port}/ok",
        "closed": "http://closed.example/x.png",
        "not http": "http://banner.example/x.png",
        "silent": "http://silent.example/x.png",
        "404": "http://web.example/missing.png",
        "redirects": "http://web.example/chain/9",
        "no such name": "http://nowhere.example/x.png",
    }
    network.names["nowhere.example"] = [[]]
    errors = {}
    with serving(tiny, allow_remote_images=True, image_timeout=1.0) as server:
        ok = httpx.post(
            server.url + "/v1/chat/completions",
            json={"messages": [user("Hi", "http://web.example/ok")], "max_tokens": 1},
            timeout=60,
        )
        assert ok.status_code == 200, ok.text  # a public host is fetched
        for what, url in urls.items():
            r = httpx.post(
                server.url + "/v1/chat/completions",
                json={"messages": [user("Hi", url)], "max_tokens": 1},
                timeout=60,
            )
            body = r.json()["error"]
            errors[what] = (r.status_code, body["message"].replace(url, "URL"), body["code"])
    assert set(errors.values()) == {
        (400, f"cannot fetch image URL 'URL': {UNREACHABLE}", "invalid_image")
    }, errors
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "mlx_llava.server")
    reasons = ["not a public address", "refused", "BadStatusLine", "took longer", "404"]
    for reason in reasons + ["more than 3 redirects", "cannot resolve nowhere.example"]:
        assert reason in logged, (reason, logged)


def test_the_command_line_says_what_went_wrong(host, capsys):
    url = f"http://127.0.0.1:{free_port()}/x.png"
    code = 0
    try:
        generate_cli.main(["--model", str(HF_HUB), "--image", url])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 1 and f"cannot fetch image URL '{url}'" in err and "refused" in err.lower()
    with pytest.raises(ImageFetchError, match="HTTP Error 404: Not Found"):
        load_image(f"{host.url}/missing.png", timeout=5)
    assert load_image(f"{host.url}/ok", timeout=5).size == (12, 9)  # any address is fetched
