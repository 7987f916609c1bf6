"""Load and soak: many rows of image URLs through pipeline.run, checking exactly-once and flat memory.

    .venv/bin/python bench/pipeline_soak.py [--rows 100000] [--workers 1] [--batch-size 32] [--rows-per-unit 1000]

A local image server (its own process, 127.0.0.1) serves a few hundred distinct small PNGs, one URL per
row (`/img/K.png?row=R`). About 1% of requests fail with HTTP 500 (rows with R % 100 == 37 answer 500 to
their first request, then the image) and 0.4% of rows point at a missing image (R % 250 == 11, HTTP 404).
The rows go through `pipeline.run` with the tiny random InstructBLIP on Ray started in-process. Every
`--sample-s` seconds the RSS of the driver and of every process under it (the model workers, raylet, GCS
and Ray's other helpers; not the image server) is sampled, with the number of rows committed so far.

At the end it checks that every row came out exactly once (ids unique, count = rows, 404 rows `error` with
`fetch_http`, all others `ok`), that the server saw each URL once (twice for the flaky ones, never a retried
404), and that memory stayed flat: from the sample at 25% of the rows to the one at 100%, the RSS of the
driver and of each model worker grew by less than --max-growth-pct percent and less than --max-growth-mb
MiB. Prints throughput and memory at 10/25/50/100% of the rows; exits 0 when everything holds, 1 if not.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import urlopen

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:  # the pipeline (torch, Ray) is imported only where it is used: the server process needs none
    from blipbatch.pipeline import RunSummary
    from blipbatch.pipeline.fetch import FetchConfig

MiB = 2**20
PROMPT = "A short image caption:"
MARKS = (0.10, 0.25, 0.50, 1.00)  # fractions of the rows at which memory is reported
FLAKY_EVERY, FLAKY_AT = 100, 37  # rows R with R % 100 == 37: first request 500, then the image
MISSING_EVERY, MISSING_AT = 250, 11  # rows R with R % 250 == 11: 404


# -- rows and their expected fate --------------------------------------------------------------------------------


def row_path(row: int, images: int) -> str:
    """The URL path of row `row`: which image, and whether it is missing or flaky."""
    k = (row * 7919) % images  # 7919 is prime: neighbouring rows get different images
    if row % MISSING_EVERY == MISSING_AT:
        return f"/missing/{k}.png?row={row}"
    if row % FLAKY_EVERY == FLAKY_AT:
        return f"/flaky/{k}.png?row={row}"
    return f"/img/{k}.png?row={row}"


def row_id(row: int) -> str:
    return f"r{row:07d}"


def expected_counts(rows: int) -> tuple[int, int]:
    """(rows that must end as 404 errors, rows that must be retried once after a 500)."""
    missing = sum(1 for r in range(rows) if r % MISSING_EVERY == MISSING_AT)
    flaky = sum(1 for r in range(rows) if r % FLAKY_EVERY == FLAKY_AT and r % MISSING_EVERY != MISSING_AT)
    return missing, flaky


# -- the image server (its own process, so that its memory and CPU are not the driver's) --------------------------


def render_images(count: int, photo_size: tuple[int, int] | None = None) -> list[bytes]:
    """`count` distinct small PNGs (sizes and colours vary with the index), or with `photo_size` (width, height)
    JPEGs of that size whose noise makes them compress like photographs."""
    from PIL import Image

    if photo_size is not None:
        import numpy as np

        rng = np.random.default_rng(0)
        jpegs = []
        for k in range(count):
            gradient = np.linspace(0, 255, photo_size[0], dtype=np.float32)[None, :, None]
            noise = rng.normal(0, 40, (photo_size[1], photo_size[0], 3))
            pixels = np.clip(gradient * ((k % 5) + 1) / 5 + noise, 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
            jpegs.append(buffer.getvalue())
        return jpegs
    pngs = []
    for k in range(count):
        image = Image.new("RGB", (32 + k % 29, 24 + k % 17), ((k * 37) % 256, (k * 91) % 256, (k * 53) % 256))
        image.paste(((k * 13) % 256, 255 - (k * 7) % 256, (k * 29) % 256), (k % 11, k % 7, 16 + k % 11, 12 + k % 7))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pngs


class SoakHandler(BaseHTTPRequestHandler):
    """/img/K.png?row=R: image K; /flaky/K.png?row=R: 500 the first time, then image K; anything else: 404;
    /_stats: the counts so far, as JSON."""

    protocol_version = "HTTP/1.1"  # keep-alive: the fetcher pools connections

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        server: SoakServer = self.server  # type: ignore[assignment]
        if self.path == "/_stats":
            self.reply(200, server.stats(), "application/json")
            return
        kind, _, name = urlsplit(self.path).path.strip("/").partition("/")
        with server.lock:
            server.hits[self.path] += 1
            first = server.hits[self.path] == 1
        index = name.removesuffix(".png")
        if kind not in ("img", "flaky") or not index.isdigit() or int(index) >= len(server.images):
            status, body = 404, b"not found"
        elif kind == "flaky" and first:
            status, body = 500, b"try again"
        else:
            status, body = 200, server.images[int(index)]
        with server.lock:
            server.statuses[status] += 1
        self.reply(status, body, "image/png" if status == 200 else "text/plain")

    def reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class SoakServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, images: int, photo_size: tuple[int, int] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), SoakHandler)
        self.images = render_images(images, photo_size)
        self.hits: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.lock = threading.Lock()

    def stats(self) -> bytes:
        with self.lock:
            return json.dumps(
                {
                    "requests": sum(self.statuses.values()),
                    "statuses": {str(k): v for k, v in self.statuses.items()},
                    # how many URLs were requested once, twice, ...
                    "urls_by_hits": {str(k): v for k, v in Counter(self.hits.values()).items()},
                }
            ).encode()


def serve(images: int, photo_size: tuple[int, int] | None = None) -> None:
    """The server process: prints its port on the first line of stdout, serves until stdin closes."""
    httpd = SoakServer(images, photo_size)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(httpd.server_address[1], flush=True)
    sys.stdin.read()  # the parent closes our stdin (or dies): stop
    httpd.shutdown()


class ImageServerProcess:
    """The image server in a child process; `url(path)`, `stats()`, and `close()` (or use it as a context)."""

    def __init__(self, images: int, timeout_s: float = 30.0, photo_size: tuple[int, int] | None = None) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", str(images)]
        if photo_size is not None:
            command += ["--photo-size", f"{photo_size[0]}x{photo_size[1]}"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        port = self._first_line(timeout_s)
        self.base = f"http://127.0.0.1:{port}"

    def _first_line(self, timeout_s: float) -> int:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not line or not line[0].strip().isdigit():
            self.close()
            raise RuntimeError(f"the image server did not start within {timeout_s:.0f} s (got {line!r})")
        return int(line[0])

    def url(self, path: str) -> str:
        return self.base + path

    def stats(self) -> dict:
        with urlopen(self.url("/_stats"), timeout=30) as response:
            return json.load(response)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> ImageServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- input --------------------------------------------------------------------------------------------------------


def write_input(
    folder: Path, server: ImageServerProcess, rows: int, images: int, rows_per_unit: int, rows_per_shard: int = 10_000
) -> str:
    """Parquet shards of (key, image_url), one row group per work unit; returns the folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, rows, rows_per_shard)):
        span = range(start, min(start + rows_per_shard, rows))
        table = pa.table(
            {"key": [row_id(r) for r in span], "image_url": [server.url(row_path(r, images)) for r in span]}
        )
        pq.write_table(table, folder / f"part-{s:05d}.parquet", row_group_size=rows_per_unit)
    return str(folder)


# -- memory sampling ----------------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since sampling started
    rows: int  # rows committed at that time
    driver: int  # RSS in bytes
    workers: dict[int, int]  # model worker pid -> RSS
    ray_system: int  # sum of the RSS of the other processes under the driver (raylet, GCS, agents, idle workers)
    system_by_role: dict[str, int] = field(default_factory=dict)  # that sum, by process role ("raylet", ...)


def process_role(name: str, cmdline: list[str]) -> str:
    """What a process under the driver is: "ray::<actor class or IDLE>" (Ray retitles its worker processes),
    the script of a Python helper ("log_monitor", "dashboard", ...), or the executable ("raylet", "gcs_server")."""
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0].split(".")[0]
    script = next((arg for arg in cmdline[1:4] if arg.endswith(".py")), None)
    return Path(script).stem if script else name


class MemorySampler:
    """A thread that samples RSS of the driver and its descendant processes every `interval_s` seconds.

    `rows_done()` is called at each sample (it counts committed rows). Processes in `exclude` (the image
    server) are not sampled. With `jsonl`, each sample is also appended to that file as it is taken, so a
    run that dies still leaves its samples."""

    def __init__(
        self, rows_done: Callable[[], int], interval_s: float, exclude: tuple[int, ...] = (), jsonl: str | None = None
    ) -> None:
        import psutil  # comes with Ray (ray/thirdparty_files), importable once ray is imported

        self._psutil = psutil
        self.rows_done = rows_done
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._start = time.monotonic()
        self._me = psutil.Process(os.getpid())
        self._exclude = set(exclude)
        self._jsonl = open(jsonl, "a") if jsonl else None

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.sample()  # one last sample after the run
        if self._jsonl is not None:
            self._jsonl.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        psutil = self._psutil
        rows = self.rows_done()
        workers: dict[int, int] = {}
        system: Counter[str] = Counter()
        for child in self._me.children(recursive=True):
            if child.pid in self._exclude:
                continue
            try:
                rss = child.memory_info().rss
                role = process_role(child.name(), child.cmdline())
            except psutil.Error:  # gone (or a zombie) since it was listed
                continue
            if role in ("ray::ModelWorker", "ray::StartingWorker"):  # StartingWorker: what pipeline.run starts
                workers[child.pid] = rss
            else:
                system[role] += rss
        sample = Sample(
            time.monotonic() - self._start,
            rows,
            self._me.memory_info().rss,
            workers,
            sum(system.values()),
            dict(system),
        )
        self.samples.append(sample)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(vars(sample)) + "\n")
            self._jsonl.flush()


@dataclass
class MemorySeries:
    """RSS of one process (or group) against rows committed."""

    name: str
    points: list[tuple[int, int]]  # (rows committed, RSS bytes), in time order

    def at(self, fraction: float, total_rows: int) -> tuple[int, int] | None:
        """The first point at or after `fraction` of the rows; at 100%, the last point if none reached it (a
        worker is stopped as soon as the last unit commits, possibly before a sample saw it)."""
        for point in self.points:
            if point[0] >= fraction * total_rows:
                return point
        return self.points[-1] if fraction >= 1.0 and self.points else None

    def growth(self, total_rows: int) -> tuple[int, float] | None:
        """(bytes, percent) gained from 25% of the rows to 100%."""
        start, end = self.at(0.25, total_rows), self.at(1.0, total_rows)
        if start is None or end is None:
            return None
        return end[1] - start[1], 100.0 * (end[1] - start[1]) / start[1]

    def slope_kib_per_1k_rows(self, total_rows: int) -> float | None:
        """Least-squares slope of RSS against rows over the points from 25% of the rows on."""
        points = [p for p in self.points if p[0] >= 0.25 * total_rows]
        if len({p[0] for p in points}) < 2:
            return None
        mx = sum(p[0] for p in points) / len(points)
        my = sum(p[1] for p in points) / len(points)
        sxx = sum((p[0] - mx) ** 2 for p in points)
        sxy = sum((p[0] - mx) * (p[1] - my) for p in points)
        return sxy / sxx * 1000 / 1024


def is_judged(name: str) -> bool:
    """Flatness is asserted for the driver and the model workers; Ray's own processes are only reported."""
    return name == "driver" or name.startswith("worker ")


def series_of(samples: list[Sample]) -> list[MemorySeries]:
    """Driver, each model worker (by pid), and the Ray system processes together."""
    series = [MemorySeries("driver", [(s.rows, s.driver) for s in samples])]
    pids = sorted({pid for s in samples for pid in s.workers})
    for pid in pids:
        series.append(MemorySeries(f"worker {pid}", [(s.rows, s.workers[pid]) for s in samples if pid in s.workers]))
    series.append(MemorySeries("ray system (sum)", [(s.rows, s.ray_system) for s in samples if s.ray_system]))
    for role in sorted({role for s in samples for role in s.system_by_role}):
        series.append(
            MemorySeries(f"  {role}", [(s.rows, s.system_by_role[role]) for s in samples if role in s.system_by_role])
        )
    return series


# -- the run ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakConfig:
    rows: int = 100_000
    workers: int = 1
    batch_size: int = 32
    rows_per_unit: int = 1000
    images: int = 300
    max_new_tokens: int = 2
    sample_s: float = 3.0
    backoff_s: float = 0.05  # the retry after a 500: short, so that it measures the pipeline, not our sleep
    max_growth_pct: float = 15.0
    max_growth_mb: float = 100.0
    workdir: str | None = None  # None: a temp folder, removed at the end
    samples_jsonl: str | None = None  # also append every memory sample to this file as it is taken
    log: bool = True  # progress lines on stderr


@dataclass
class SoakReport:
    config: SoakConfig
    wall_s: float  # pipeline.run, from call to return
    summary: RunSummary
    rows_out: int
    ids_unique: bool
    statuses: dict[str, int]  # "ok", "error:<kind>" -> rows
    wrong_rows: list[str]  # ids whose status is not what their URL implies (first 20)
    server: dict
    expected_missing: int
    expected_flaky: int
    samples: list[Sample] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.config.rows / self.wall_s

    @property
    def series(self) -> list[MemorySeries]:
        return series_of(self.samples)

    @property
    def exactly_once(self) -> bool:
        return self.rows_out == self.config.rows and self.ids_unique and not self.wrong_rows

    @property
    def server_as_expected(self) -> bool:
        """Each URL fetched once, the flaky ones twice (500 then 200), 404s never retried."""
        n, missing, flaky = self.config.rows, self.expected_missing, self.expected_flaky
        hits = {int(k): v for k, v in self.server["urls_by_hits"].items()}
        statuses = {int(k): v for k, v in self.server["statuses"].items()}
        return hits == {k: v for k, v in {1: n - flaky, 2: flaky}.items() if v} and statuses == {
            k: v for k, v in {200: n - missing, 500: flaky, 404: missing}.items() if v
        }

    def flat(self, name: str) -> bool | None:
        """Whether one series stayed flat from 25% to 100% of the rows (None: too few samples to say)."""
        found = next(s for s in self.series if s.name == name)
        growth = found.growth(self.config.rows)
        if growth is None:
            return None
        grown, pct = growth
        return grown < self.config.max_growth_mb * MiB and pct < self.config.max_growth_pct

    @property
    def memory_flat(self) -> bool:
        """Driver and every model worker flat (the Ray system processes are reported, not judged)."""
        judged = [s.name for s in self.series if is_judged(s.name)]
        return len(judged) > 1 and all(self.flat(name) for name in judged)

    def text(self) -> str:
        c, summary = self.config, self.summary
        lines = [
            f"rows: {c.rows} (images {c.images}, workers {c.workers}, batch {c.batch_size}, rows/unit "
            f"{c.rows_per_unit}, max_new_tokens {c.max_new_tokens})",
            f"throughput: {self.rows_per_s:.1f} rows/s ({self.wall_s:.1f} s in pipeline.run)",
            f"summary: {summary.units_done} units done, {summary.units_failed} failed; rows {summary.rows_ok} ok, "
            f"{summary.rows_error} error {summary.errors_by_kind}",
            f"exactly once: {'yes' if self.exactly_once else 'NO'} ({self.rows_out} rows out, ids "
            f"{'unique' if self.ids_unique else 'DUPLICATED'}, {dict(sorted(self.statuses.items()))}"
            + (f", wrong status: {self.wrong_rows}" if self.wrong_rows else "")
            + ")",
            f"server: {'as expected' if self.server_as_expected else 'UNEXPECTED'}: {self.server['requests']} "
            f"requests, statuses {self.server['statuses']}, URLs by hits {self.server['urls_by_hits']} "
            f"(expected {self.expected_flaky} retried 500s, {self.expected_missing} 404s)",
            "",
            f"memory, RSS MiB, by rows committed ({len(self.samples)} samples every {c.sample_s:g} s):",
            f"{'process':<26}"
            + "".join(f"{f'{m:.0%}':>9}" for m in MARKS)
            + f"{'25->100%':>18}{'KiB/1k rows':>13}  flat",
        ]
        for s in self.series:
            cells = []
            for mark in MARKS:
                point = s.at(mark, c.rows)
                cells.append(f"{point[1] / MiB:9.1f}" if point else f"{'-':>9}")
            growth, slope = s.growth(c.rows), s.slope_kib_per_1k_rows(c.rows)
            grown = f"{growth[0] / MiB:+9.1f} ({growth[1]:+5.1f}%)" if growth else "-"
            verdict = {True: "yes", False: "NO", None: "?"}[self.flat(s.name)] if is_judged(s.name) else "(not judged)"
            lines.append(
                f"{s.name:<26}"
                + "".join(cells)
                + f"{grown:>18}"
                + (f"{slope:13.1f}" if slope is not None else f"{'-':>13}")
                + f"  {verdict}"
            )
        end_rows = {s.name: s.at(1.0, c.rows) for s in self.series if is_judged(s.name)}
        lines.append(
            "(100%: the first sample after the last commit; for a worker stopped before one, its last "
            "sample, at rows " + ", ".join(f"{name} {p[0]}" for name, p in end_rows.items() if p) + ")"
        )
        lines.append(
            f"memory flat: {'yes' if self.memory_flat else 'NO'} (driver and each worker: growth from 25% "
            f"to 100% of the rows below {c.max_growth_pct:g}% and below {c.max_growth_mb:g} MiB)"
        )
        return "\n".join(lines)


def fetch_config(backoff_s: float) -> FetchConfig:
    """FetchConfig admitting the image server on 127.0.0.1 (the address guard refuses loopback by default)."""
    from blipbatch.pipeline.fetch import FetchConfig

    return FetchConfig(backoff_s=backoff_s, allow_hosts=("127.0.0.1",))


def check_output(output: str, images: int) -> tuple[int, bool, dict[str, int], list[str]]:
    """(rows out, ids unique, status counts, ids whose status is not the one their URL implies)."""
    from blipbatch.pipeline.sink import read_output

    table = read_output(output).select(["id", "image_url", "status", "error_kind"])
    ids = table.column("id").to_pylist()
    statuses: Counter[str] = Counter()
    wrong = []
    for row_id_, url, status, kind in zip(
        ids, *(table.column(n).to_pylist() for n in ("image_url", "status", "error_kind"))
    ):
        statuses[status if status == "ok" else f"{status}:{kind}"] += 1
        path = row_path(int(row_id_[1:]), images)
        expected = ("error", "fetch_http") if path.startswith("/missing/") else ("ok", None)
        parts = urlsplit(url)
        if (status, kind) != expected or f"{parts.path}?{parts.query}" != path:
            wrong.append(row_id_)
    return len(ids), len(ids) == len(set(ids)), dict(statuses), wrong[:20]


def run_soak(config: SoakConfig) -> SoakReport:
    """Run the soak; Ray is started in-process (and shut down after) unless it is already initialized."""
    import ray

    from blipbatch import pipeline
    from blipbatch.pipeline.run import connect_ray
    from blipbatch.pipeline.shards import discover_shards, plan_units
    from blipbatch.pipeline.sink import committed_units
    from blipbatch.schemas import ColumnMapping
    from tests.tiny import write_tiny_checkpoint

    def log(message: str) -> None:
        if config.log:
            print(message, file=sys.stderr, flush=True)

    workdir = Path(config.workdir or tempfile.mkdtemp(prefix="bb-soak-"))
    started_ray = not ray.is_initialized()
    try:
        with ImageServerProcess(config.images) as server:
            checkpoint = str(write_tiny_checkpoint(workdir / "model"))
            source = write_input(workdir / "in", server, config.rows, config.images, config.rows_per_unit)
            output = str(workdir / "out")
            mapping = ColumnMapping(id_column="key")
            unit_rows = {
                u.unit_id: u.num_rows for u in plan_units(discover_shards(source), mapping, config.rows_per_unit)
            }
            if started_ray:
                connect_ray(None, num_cpus=os.cpu_count())

            last_logged = [0.0]

            def rows_done() -> int:
                done = sum(unit_rows.get(unit, 0) for unit in committed_units(output))
                if done >= last_logged[0] + 0.1 * config.rows:
                    last_logged[0] = done
                    log(f"  {done}/{config.rows} rows committed")
                return done

            log(f"soak: {config.rows} rows, {len(unit_rows)} units, into {output}")
            sampler = MemorySampler(rows_done, config.sample_s, (server.process.pid,), config.samples_jsonl).start()
            start = time.monotonic()
            try:
                summary = pipeline.run(
                    source,
                    output,
                    checkpoint,
                    prompt=PROMPT,
                    id_column="key",
                    batch_size=config.batch_size,
                    workers=config.workers,
                    max_new_tokens=config.max_new_tokens,
                    rows_per_unit=config.rows_per_unit,
                    fetch=fetch_config(config.backoff_s),
                    progress=False,
                )
            finally:
                wall_s = time.monotonic() - start
                sampler.stop()
            server_stats = server.stats()
        rows_out, unique, statuses, wrong = check_output(output, config.images)
        missing, flaky = expected_counts(config.rows)
        return SoakReport(
            config, wall_s, summary, rows_out, unique, statuses, wrong, server_stats, missing, flaky, sampler.samples
        )
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
        if config.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=SoakConfig.rows)
    parser.add_argument("--workers", type=int, default=SoakConfig.workers)
    parser.add_argument("--batch-size", type=int, default=SoakConfig.batch_size)
    parser.add_argument("--rows-per-unit", type=int, default=SoakConfig.rows_per_unit)
    parser.add_argument("--images", type=int, default=SoakConfig.images, help="distinct images on the server")
    parser.add_argument("--max-new-tokens", type=int, default=SoakConfig.max_new_tokens)
    parser.add_argument("--sample-s", type=float, default=SoakConfig.sample_s, help="seconds between samples")
    parser.add_argument("--max-growth-pct", type=float, default=SoakConfig.max_growth_pct)
    parser.add_argument("--max-growth-mb", type=float, default=SoakConfig.max_growth_mb)
    parser.add_argument("--workdir", help="keep inputs and output here (default: a temp folder, removed)")
    parser.add_argument("--samples-jsonl", help="also append every memory sample to this file as it is taken")
    parser.add_argument("--serve", type=int, metavar="IMAGES", help=argparse.SUPPRESS)  # the server process
    parser.add_argument("--photo-size", help=argparse.SUPPRESS)  # the server process: WIDTHxHEIGHT JPEGs
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, tuple(int(n) for n in args.photo_size.split("x")) if args.photo_size else None)
        return 0
    if os.environ.pop("RAY_ADDRESS", None):
        print("RAY_ADDRESS ignored: the soak samples processes of an in-process Ray", file=sys.stderr)
    config = SoakConfig(
        rows=args.rows,
        workers=args.workers,
        batch_size=args.batch_size,
        rows_per_unit=args.rows_per_unit,
        images=args.images,
        max_new_tokens=args.max_new_tokens,
        sample_s=args.sample_s,
        max_growth_pct=args.max_growth_pct,
        max_growth_mb=args.max_growth_mb,
        workdir=args.workdir,
        samples_jsonl=args.samples_jsonl,
    )
    report = run_soak(config)
    print(report.text())
    return 0 if report.exactly_once and report.server_as_expected and report.memory_flat else 1


if __name__ == "__main__":
    sys.exit(main())
