"""Planning cost of WebDataset input: one scan of a tar's headers (and its small .json/.txt members), and one unit
reading its byte range. Writes a tar of N samples (random 30 KB "jpg", txt, json) with webdataset's ShardWriter.

    .venv/bin/python bench/webdataset_scan.py --samples 10000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows-per-unit", type=int, default=1000)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bb-wds-bench-")
    try:
        measure(folder, args)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure(folder: str, args: argparse.Namespace) -> None:
    import webdataset as wds

    from blipbatch.pipeline.webdataset import read_slice, scan, slices

    with wds.ShardWriter(os.path.join(folder, "b-%04d.tar"), maxcount=args.samples, verbose=0) as sink:
        for k in range(args.samples):
            sink.write(
                {
                    "__key__": f"{k:09d}",
                    "jpg": os.urandom(30000),
                    "txt": f"caption {k}",
                    "json": {"caption": f"alt {k}", "width": 256, "url": f"http://x/{k}.jpg"},
                }
            )
    tar = os.path.join(folder, "b-0000.tar")
    scans, reads = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        index = scan(tar, "image_url")
        scans.append(time.perf_counter() - start)
        part = slices(index, args.rows_per_unit)[0][1]
        start = time.perf_counter()
        read_slice(tar, part, index.schema, "image_url", None)
        reads.append(time.perf_counter() - start)
    size = os.path.getsize(tar) / 2**20
    print(f"tar: {args.samples} samples, {size:.0f} MiB")
    print(
        f"scan (plan): median {statistics.median(scans):.2f} s ({statistics.median(scans) / args.samples * 1e6:.0f} "
        "us a sample)"
    )
    print(f"read one unit of {args.rows_per_unit} samples: median {statistics.median(reads):.3f} s")


if __name__ == "__main__":
    main()
