"""X-Robots-Tag opt-outs and the User-Agent, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import pytest

from blipbatch import __version__
from blipbatch.jobs.spec import SpecError, load_spec
from blipbatch.pipeline.errors import RowError
from blipbatch.pipeline.fetch import FetchConfig, Fetcher

IMAGE = b"\x89PNG not really, the fetcher does not decode"


class Handler(BaseHTTPRequestHandler):
    """/img?tag=V&tag=W answers IMAGE with an X-Robots-Tag header per `tag`; records each request's User-Agent."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.agents.append(self.headers.get("User-Agent"))  # type: ignore[attr-defined]
        self.send_response(200)
        for name, value in parse_qsl(urlsplit(self.path).query):
            if name == "tag":
                self.send_header("X-Robots-Tag", value)
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        self.wfile.write(IMAGE)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.agents = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def url(server, *tags: str) -> str:
    from urllib.parse import urlencode

    return f"http://127.0.0.1:{server.server_address[1]}/img?{urlencode([('tag', t) for t in tags])}"


def fetcher(**settings) -> Fetcher:
    return Fetcher(FetchConfig(allow_hosts=("127.0.0.1",), retries=0, **settings))


@pytest.mark.parametrize(
    "tags",
    [
        ("noai",),
        ("noimageai",),
        ("noindex",),
        ("noimageindex",),
        ("NoAI",),
        ("nofollow, noai",),
        ("blipbatch: noai",),
        ("BlipBatch: noimageindex, nofollow",),
        ("otherbot: noai", "noindex"),
        ("nofollow", "blipbatch: noai"),
    ],
)
def test_opt_out_directives_for_everyone_or_for_us_make_an_opted_out_row(server, tags):
    with pytest.raises(RowError) as info:
        fetcher().fetch(url(server, *tags))
    assert info.value.kind == "opted_out"
    assert "opts out of AI use (X-Robots-Tag:" in info.value.message
    assert "honour_opt_out = false" in info.value.message


@pytest.mark.parametrize(
    "tags",
    [
        (),
        ("nofollow",),
        ("noarchive, nosnippet",),
        ("otherbot: noai",),
        ("googlebot: noindex, noimageindex",),
        ("unavailable_after: 25 Jun 2010 15:00:00",),
    ],
)
def test_other_directives_and_other_agents_prefixes_do_not_apply(server, tags):
    assert fetcher().fetch(url(server, *tags)) == IMAGE


def test_honour_opt_out_false_fetches_it_all_the_same(server):
    assert fetcher(honour_opt_out=False).fetch(url(server, "noai")) == IMAGE


def test_requests_name_blipbatch_and_its_version_or_the_configured_agent(server):
    server.agents.clear()
    fetcher().fetch(url(server))
    fetcher(user_agent="my-lab-crawler/2 (+https://lab.example/contact)").fetch(url(server))
    assert server.agents == [
        f"blipbatch/{__version__}",
        "my-lab-crawler/2 (+https://lab.example/contact)",
    ]


def test_the_spec_sets_both_and_checks_their_types(tmp_path):
    spec = tmp_path / "job.toml"
    base = '[job]\nkind = "caption"\n[input]\npath = "in"\n[output]\npath = "out"\n[model]\npath = "m"\n[fetch]\n'
    spec.write_text(base + 'honour_opt_out = false\nuser_agent = "lab/1"\n')
    job = load_spec(spec)
    assert (job.fetch.honour_opt_out, job.fetch.user_agent) == (False, "lab/1")
    spec.write_text(base + 'honour_opt_out = "no"\n')
    with pytest.raises(SpecError, match=r"job.toml:10: \[fetch\] honour_opt_out: expected true or false"):
        load_spec(spec)
    spec.write_text(base + 'user_agent = ""\n')
    with pytest.raises(SpecError, match=r"job.toml:10: \[fetch\] user_agent: expected a non-empty string"):
        load_spec(spec)
