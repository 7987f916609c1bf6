"""The fetch guard: private addresses refused unless allow-listed (real HTTP and HTTPS servers on loopback), every
redirect hop checked, the connection pinned to the checked address, local files only inside the local roots."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import PIL.Image
import pytest

from blipbatch.pipeline.errors import RowError
from blipbatch.pipeline.fetch import FetchConfig, Fetcher
from blipbatch.pipeline.guard import AllowList, address_problem, risky_local_roots


def _png() -> bytes:
    out = io.BytesIO()
    PIL.Image.new("RGB", (8, 8), (0, 90, 200)).save(out, "PNG")
    return out.getvalue()


PNG = _png()


def fetcher(*allow_hosts: str, local_roots: tuple[str, ...] = ()) -> Fetcher:
    return Fetcher(FetchConfig(allow_hosts=allow_hosts, local_roots=local_roots, timeout_s=2.0, retries=0))


def blocked(fetch: Fetcher, ref: str, *fragments: str) -> str:
    with pytest.raises(RowError) as caught:
        fetch.fetch(ref)
    assert caught.value.kind == "blocked_address", caught.value
    for fragment in fragments:
        assert fragment in caught.value.message, caught.value.message
    return caught.value.message


# -- servers ---------------------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """/img/T: the image; /to/URL: a 302 redirect to URL. Every request is recorded as (path, Host header)."""

    protocol_version = "HTTP/1.0"  # a connection per request: each request makes a new, newly checked connection

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests.append((self.path, self.headers.get("Host")))
        if self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/to/") :])
            body = b""
        else:
            self.send_response(200)
            body = PNG
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.port = self.server_address[1]

    def paths(self) -> list[str]:
        with self.lock:
            return [path for path, _ in self.requests]


@contextlib.contextmanager
def serving(*servers: Server):
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield servers
    finally:
        for server, thread in zip(servers, threads):
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


@pytest.fixture(scope="module")
def pair():
    """(inside, other): servers on 127.0.0.1 and 127.0.0.2 on the same port, so a URL's port reaches either."""
    for _ in range(20):
        other = Server("127.0.0.2")
        try:
            inside = Server("127.0.0.1", other.port)
            break
        except OSError:  # that port is taken on 127.0.0.1: try another
            other.server_close()
    else:
        pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")
    with serving(inside, other):
        yield inside, other


@pytest.fixture(scope="module")
def ipv6_server():
    try:
        server = Server("::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    with serving(server):
        yield server


# -- loopback forms --------------------------------------------------------------------------------------------------

LOOPBACK_FORMS = ["127.0.0.1", "localhost", "2130706433", "127.1", "0x7f.0.0.1", "0177.0.0.1", "[::ffff:127.0.0.1]"]


@pytest.mark.parametrize("host", LOOPBACK_FORMS)
def test_loopback_forms_are_blocked_without_the_allow_list(pair, host):
    inside, _ = pair
    path = f"/img/blocked-{host.strip('[]')}"
    message = blocked(
        fetcher(),
        f"http://{host}:{inside.port}{path}",
        f"host {host.strip('[]')!r}",
        "127.0.0.1",
        "loopback",
        "allow_hosts",
    )
    assert path not in inside.paths(), "the guard let a request through"
    assert "fetching from it is refused" in message


@pytest.mark.parametrize("host", LOOPBACK_FORMS)
def test_loopback_forms_are_fetched_with_the_allow_list(pair, host):
    inside, _ = pair
    path = f"/img/allowed-{host.strip('[]')}"
    # "localhost" may also resolve to ::1 on other machines; each address of an answer must be admitted
    assert fetcher("127.0.0.1", "::1").fetch(f"http://{host}:{inside.port}{path}") == PNG
    assert inside.paths().count(path) == 1


def test_ipv6_loopback(ipv6_server):
    url = f"http://[::1]:{ipv6_server.port}/img/v6"
    blocked(fetcher("127.0.0.1"), url, "host '::1' resolves to ::1, a loopback address")
    assert ipv6_server.paths() == []
    assert fetcher("::1").fetch(url) == PNG
    assert fetcher("::/127").fetch(url) == PNG  # a network that holds ::1
    assert ipv6_server.paths() == ["/img/v6", "/img/v6"]


def test_a_host_name_on_the_allow_list_is_trusted_whatever_it_resolves_to(pair):
    inside, _ = pair
    assert fetcher("LocalHost").fetch(f"http://localhost:{inside.port}/img/by-name") == PNG
    # the Host header names the host of the URL, though the socket went to the checked address
    assert ("/img/by-name", f"localhost:{inside.port}") in inside.requests
    # a name on the list admits that name only, not the addresses it resolves to
    blocked(fetcher("localhost"), f"http://127.0.0.1:{inside.port}/img/by-address", "127.0.0.1")


@pytest.mark.parametrize(
    "url, fragments",
    [
        ("http://169.254.169.254/latest/meta-data/", ("169.254.169.254", "link-local")),  # cloud metadata
        ("http://10.1.2.3/x.png", ("10.1.2.3", "private")),
        ("http://192.168.0.1/x.png", ("192.168.0.1", "private")),
        ("http://0/x.png", ("0.0.0.0", "unspecified")),
        ("http://224.0.0.1/x.png", ("multicast",)),
        ("http://100.64.0.1/x.png", ("not a globally routable",)),  # carrier-grade NAT
        ("http://[fd00:ec2::254]/latest", ("fd00:ec2::254", "private")),  # AWS metadata over IPv6
        ("http://[fe80::1]/x.png", ("link-local",)),
        ("http://[64:ff9b::7f00:1]/x.png", ("IPv4 127.0.0.1", "loopback")),  # NAT64
        ("http://[2002:a00:1::]/x.png", ("6to4 address carrying 10.0.0.1", "private")),
    ],
)
def test_other_non_public_addresses_are_blocked(url, fragments):
    blocked(fetcher(), url, *fragments)  # refused before any connection: nothing on these addresses is reached


def test_address_rules():
    for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "64:ff9b::808:808", "2002:808:808::1"]:
        assert address_problem(ipaddress.ip_address(public)) is None, public
    assert address_problem(ipaddress.ip_address("::ffff:10.0.0.1")) == "a private address"
    assert address_problem(ipaddress.ip_address("240.0.0.1")) is not None
    allow = AllowList.parse(["10.0.0.0/8", "[::1]", "Images.Internal."])
    assert allow.names == {"images.internal"} and allow.admits_host("IMAGES.internal.")
    assert allow.admits_address(ipaddress.ip_address("10.9.8.7"))
    assert allow.admits_address(ipaddress.ip_address("::ffff:10.9.8.7"))
    assert not allow.admits_address(ipaddress.ip_address("11.0.0.1"))
    # an IPv4 address is never inside an IPv6 network, though ipaddress alone would compare their integers
    assert not AllowList.parse(["::1"]).admits_address(ipaddress.ip_address("0.0.0.1"))


# -- redirects -------------------------------------------------------------------------------------------------------


def test_a_redirect_to_a_blocked_address_is_blocked(pair):
    inside, other = pair
    url = f"http://127.0.0.1:{inside.port}/to/http://127.0.0.2:{other.port}/img/hop"
    blocked(fetcher("127.0.0.1"), url, "host '127.0.0.2' resolves to 127.0.0.2, a loopback address")
    assert other.paths() == [], "the redirect reached a blocked address"
    assert inside.paths().count(f"/to/http://127.0.0.2:{other.port}/img/hop") == 1
    # the same redirect with the target admitted is followed
    assert fetcher("127.0.0.1", "127.0.0.2").fetch(url) == PNG
    assert other.paths() == ["/img/hop"]
    blocked(
        fetcher("127.0.0.1"),
        f"http://127.0.0.1:{inside.port}/to/http://169.254.169.254/latest/meta-data/",
        "169.254.169.254",
        "link-local",
    )
    blocked(
        fetcher("127.0.0.1"),
        f"http://127.0.0.1:{inside.port}/to/http://2130706434:{other.port}/img/hop",
        "host '2130706434' resolves to 127.0.0.2",
    )
    assert other.paths() == ["/img/hop"]


# -- DNS: every address checked, the connection pinned to the checked one ----------------------------------------------


@pytest.fixture
def resolver(monkeypatch):
    """Answers for made-up names, in turn: {name: [[addresses of the 1st answer], [of the 2nd], ...]} (the last answer
    repeats); other names go to the system resolver. Records each lookup of a made-up name."""
    real = socket.getaddrinfo
    answers: dict[str, list[list[str]]] = {}
    lookups: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        addresses = answers[host][0] if len(answers[host]) == 1 else answers[host].pop(0)
        return [info for address in addresses for info in real(address, port, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers, lookups


def test_the_connection_goes_to_the_checked_address(pair, resolver):
    inside, other = pair
    answers, lookups = resolver
    # DNS rebinding: the first answer passes the check, every later one points inside
    answers["rebind.test"] = [["127.0.0.2"], ["127.0.0.1"]]
    fetch = fetcher("127.0.0.2")
    url = f"http://rebind.test:{other.port}/img/rebind"
    assert fetch.fetch(url) == PNG
    assert lookups == ["rebind.test"], "the name was resolved again after the check"
    assert other.requests[-1] == ("/img/rebind", f"rebind.test:{other.port}")
    assert "/img/rebind" not in inside.paths()
    # the next connection resolves and checks again, and the new answer is refused
    blocked(fetch, url, "host 'rebind.test' resolves to 127.0.0.1")
    assert lookups == ["rebind.test"] * 2
    assert "/img/rebind" not in inside.paths()


def test_every_address_of_an_answer_is_checked(pair, resolver):
    inside, _ = pair
    answers, _ = resolver
    answers["mixed.test"] = [["93.184.215.14", "127.0.0.1"]]  # a public address first does not hide the loopback
    blocked(fetcher(), f"http://mixed.test:{inside.port}/img/mixed", "resolves to 127.0.0.1")
    # checked addresses are tried in order, as a plain connect would: nothing listens on 127.0.0.3
    answers["fallback.test"] = [["127.0.0.3", "127.0.0.1"]]
    assert fetcher("127.0.0.0/8").fetch(f"http://fallback.test:{inside.port}/img/fallback") == PNG
    assert inside.paths().count("/img/fallback") == 1


# -- TLS: the socket is pinned, the certificate and SNI are still the URL's host ---------------------------------------


def make_certificates(folder) -> tuple[str, str, str]:
    """A CA and a certificate for "localhost" it signed: (ca.pem, cert.pem, key.pem)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)

    def builder(subject: str, issuer: str, key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(hours=1))
        )

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    usage = dict(
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    ca = (
        builder("blipbatch test CA", "blipbatch test CA", ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        builder("localhost", "blipbatch test CA", key)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = [str(folder / name) for name in ("ca.pem", "cert.pem", "key.pem")]
    for path, data in zip(
        paths,
        [
            ca.public_bytes(serialization.Encoding.PEM),
            leaf.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        ],
    ):
        with open(path, "wb") as f:
            f.write(data)
    return paths[0], paths[1], paths[2]


def test_https_verifies_the_url_host_over_the_pinned_socket(tmp_path, monkeypatch):
    ca, cert, key = make_certificates(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server_names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)
    monkeypatch.setenv("SSL_CERT_FILE", ca)  # the client trusts our CA (OpenSSL reads it when a context loads)
    with serving(Server("127.0.0.1", tls=context)) as (server,):
        assert fetcher("localhost").fetch(f"https://localhost:{server.port}/img/tls") == PNG
        assert server_names == ["localhost"] and server.paths() == ["/img/tls"]
        # verification is on: the certificate names localhost, not the address the socket went to
        with pytest.raises(RowError) as caught:
            fetcher("127.0.0.1").fetch(f"https://127.0.0.1:{server.port}/img/by-ip")
        assert caught.value.kind == "fetch_connection" and "TLS error" in caught.value.message
        blocked(fetcher(), f"https://localhost:{server.port}/img/tls", "127.0.0.1")
        assert server.paths() == ["/img/tls"]


# -- local files -----------------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    """root/ with a.png, a symlink to it and a symlink out of it; outside/secret.png; root-evil/ next to root."""
    root, outside, evil = tmp_path / "root", tmp_path / "outside", tmp_path / "root-evil"
    for folder in (root / "sub", outside, evil):
        folder.mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(b"not for you")
    (evil / "a.png").write_bytes(b"not for you")
    (root / "inner-link.png").symlink_to(root / "sub" / "a.png")
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "escape-dir").symlink_to(outside, target_is_directory=True)
    (tmp_path / "root-link").symlink_to(root, target_is_directory=True)
    return tmp_path


def test_local_files_inside_the_roots_are_read(tree):
    fetch = fetcher(local_roots=(str(tree / "root"),))
    for ref in [
        tree / "root" / "sub" / "a.png",
        f"file://{tree}/root/sub/a.png",
        tree / "root" / "inner-link.png",
        tree / "root" / "sub" / ".." / "sub" / "a.png",
        tree / "root-link" / "sub" / "a.png",
    ]:
        assert fetch.fetch(str(ref)) == PNG, ref
    # a root given through a symlink holds what its real folder holds
    assert fetcher(local_roots=(str(tree / "root-link"),)).fetch(str(tree / "root" / "sub" / "a.png")) == PNG
    with pytest.raises(RowError) as caught:
        fetch.fetch(str(tree / "root" / "missing.png"))
    assert caught.value.kind == "invalid_input" and "no such file" in caught.value.message


def test_local_files_outside_the_roots_are_refused(tree):
    fetch = fetcher(local_roots=(str(tree / "root"),))
    blocked(fetch, str(tree / "outside" / "secret.png"), "outside [fetch] local_roots", str(tree / "root"))
    blocked(fetch, f"file://{tree}/outside/secret.png", "outside [fetch] local_roots")
    blocked(fetch, str(tree / "root" / ".." / "outside" / "secret.png"), f"resolves to {tree}/outside/secret.png")
    blocked(fetch, str(tree / "root" / "escape.png"), f"resolves to {tree}/outside/secret.png")
    blocked(fetch, str(tree / "root" / "escape-dir" / "secret.png"), "resolves to")
    blocked(fetch, str(tree / "root-evil" / "a.png"), "outside")  # a name that only starts like the root
    blocked(fetch, "/etc/passwd", "outside")
    # refused before it is looked for: a refusal does not tell whether the file exists
    blocked(fetch, str(tree / "outside" / "missing.png"), "outside")


def test_a_folder_swapped_for_a_symlink_after_the_check_is_never_followed(tree):
    """A thread swaps root/sub between the real folder and a symlink out of the root, in a loop, while two threads
    fetch root/sub/a.png: each fetch reads the image or is refused, never the file outside (the check-then-open race
    read outside the root 9 times in 4,000 before the path was opened component by component without links)."""
    root, sub, parked = tree / "root", tree / "root" / "sub", tree / "root" / "parked"
    (tree / "outside" / "a.png").write_bytes(b"not for you")
    fetch = fetcher(local_roots=(str(root),))
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.rename(sub, parked)
            os.symlink(tree / "outside", sub)
            os.unlink(sub)
            os.rename(parked, sub)

    outcomes: list[bytes | str] = []

    def read(n: int) -> None:
        for _ in range(n):
            try:
                outcomes.append(fetch.fetch(str(sub / "a.png")))
            except RowError as err:
                outcomes.append(err.kind)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    readers = [threading.Thread(target=read, args=(1000,)) for _ in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=60)
    stop.set()
    swapper.join(timeout=5)
    assert len(outcomes) == 2000
    assert b"not for you" not in outcomes
    assert set(outcomes) <= {PNG, "blocked_address", "invalid_input"}
    assert PNG in outcomes  # the swap left the real folder in place part of the time


def test_no_roots_means_no_local_files(tree):
    blocked(fetcher(), str(tree / "root" / "sub" / "a.png"), "no [fetch] local_roots are set")
    blocked(fetcher(), f"file://{tree}/root/sub/a.png", "no [fetch] local_roots are set")


# -- configuration ---------------------------------------------------------------------------------------------------


def test_config_checks_the_allow_list_and_roots():
    config = FetchConfig(allow_hosts=["images.internal", "10.0.0.0/8", "[::1]"], local_roots=["/data/images"])
    assert config.allow_hosts == ("images.internal", "10.0.0.0/8", "[::1]") and config.local_roots == ("/data/images",)
    for bad in ["http://images.internal", "host:8080", "10.0.0.0/33", "a/b", ""]:
        with pytest.raises(ValueError, match="allow_hosts"):
            FetchConfig(allow_hosts=(bad,))
    with pytest.raises(ValueError, match="a tuple of strings"):
        FetchConfig(allow_hosts="127.0.0.1")
    with pytest.raises(ValueError, match="not an absolute path"):
        FetchConfig(local_roots=("images",))
    assert FetchConfig().allow_hosts == () and FetchConfig().local_roots == ()
    assert os.path.isabs(FetchConfig(local_roots=("/",)).local_roots[0])


def test_roots_that_open_the_whole_disk_or_a_home_folder_are_warned_about(tmp_path, monkeypatch):
    home = tmp_path / "home" / "ann"
    (home / "pictures").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    warnings = risky_local_roots(["/", str(home), str(tmp_path / "home"), str(home / "pictures"), f"{home}/.."])
    assert warnings == [
        "[fetch] local_roots entry '/' is the whole file system: any row of the input can read any file in it "
        "(SSH keys, cloud credentials); list only the folders that hold the images",
        f"[fetch] local_roots entry '{home}' is a home folder: any row of the input can read any file in it "
        "(SSH keys, cloud credentials); list only the folders that hold the images",
        f"[fetch] local_roots entry '{tmp_path / 'home'}' holds home folders: any row of the input can read any file "
        "in it (SSH keys, cloud credentials); list only the folders that hold the images",
        f"[fetch] local_roots entry '{home}/..' holds home folders: any row of the input can read any file in it "
        "(SSH keys, cloud credentials); list only the folders that hold the images",
    ]
    assert risky_local_roots([str(home / "pictures"), str(tmp_path)]) == [
        f"[fetch] local_roots entry '{tmp_path}' holds home folders: any row of the input can read any file in it "
        "(SSH keys, cloud credentials); list only the folders that hold the images"
    ]
    assert risky_local_roots([str(home / "pictures")]) == []
