"""Upload throughput of async_ckpt's remote tier against s3fs ``put_file``, and the training stall with a URL.

    python -m benchmarks.upload                       # --quick: 64 MiB, 3 interleaved rounds
    python -m benchmarks.upload --size 512 --rounds 5 --json out.json

Both sides upload the same file to the same S3 API server, a moto server started here as a subprocess on a free
127.0.0.1 port (nothing leaves the machine), with the same part size and concurrency:

- uploader: :class:`~async_ckpt.core.uploader.RemoteTier` from ``submit`` until the manifest is published: a CRC-32
  pass over the file, the multipart upload (s3fs ``put_file``), a HEAD of the object and the conditional create of
  the manifest;
- put_file: s3fs ``put_file(chunksize=..., max_concurrency=...)`` of the same file to another key.

Rounds alternate the order. The ratio is uploader / put_file throughput (1.0: the tier adds nothing measurable).
Then the stall: the median time ``Checkpointer.save`` blocks the training thread, local directory against a URL
(same state, same number of saves), which should not differ: uploads run on their own thread.

A loopback moto server has no network latency, no real throttling and keeps objects in memory: these figures say
what the tier adds on top of s3fs, not what a real bucket sustains (see docs/remote.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

MiB = 2**20
BUCKET = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """A moto server subprocess on a free loopback port, and its endpoint (waits until it answers)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
            return proc, endpoint
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the moto server did not start (pip install 'moto[server]')") from None
            time.sleep(0.1)  # polling a subprocess's readiness, not synchronizing threads


def options(endpoint: str) -> dict[str, Any]:
    return {
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import boto3
    import s3fs
    import torch

    from async_ckpt.core.checkpointer import Checkpointer
    from async_ckpt.core.uploader import RemoteTier, UploadOptions
    from async_ckpt.pipeline.integrity import entry_for, update_manifest
    from async_ckpt.pipeline.storage import FileStorage

    proc, endpoint = start_moto()
    try:
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)
        part, conc = args.part_size * MiB, args.concurrency
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options(endpoint))
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "local")
            os.makedirs(local)
            path = os.path.join(local, "step_00000000.pt")
            torch.save({"w": torch.randn(args.size * MiB // 4)}, path)
            update_manifest(FileStorage(fsync=False), local, {"step_00000000.pt": entry_for(path, {"step": 0})}, [])
            nbytes = os.path.getsize(path)
            tier_s: list[float] = []
            put_s: list[float] = []
            phases: dict[str, list[float]] = {"checksum_s": [], "upload_s": [], "publish_s": []}
            for r in range(args.rounds):

                def tier(r: int = r) -> None:
                    upload = UploadOptions(part_size=part, concurrency=conc)
                    t = RemoteTier(
                        f"s3://{BUCKET}/tier{r}", storage_options=options(endpoint), local_dir=local, options=upload
                    )
                    t.start()
                    t0 = time.perf_counter()
                    t.submit(path)
                    t.wait()
                    tier_s.append(time.perf_counter() - t0)
                    t.close()
                    errors = t.take_errors()
                    if errors:
                        raise errors[0]
                    (done,) = [u for u in t.stats.uploads if u.ok]
                    for key, values in phases.items():
                        values.append(getattr(done, key))

                def put(r: int = r) -> None:
                    t0 = time.perf_counter()
                    fs.put_file(path, f"{BUCKET}/put{r}/step_00000000.pt", chunksize=part, max_concurrency=conc)
                    put_s.append(time.perf_counter() - t0)

                for fn in (tier, put) if r % 2 == 0 else (put, tier):
                    fn()

            blocked: dict[str, list[float]] = {"local": [], "url": []}
            state = {"w": torch.randn(args.stall_size * MiB // 4)}
            for kind in ("local", "url", "local", "url"):  # interleaved
                kwargs: dict[str, Any] = {"keep_last": 1, "fsync": False}
                if kind == "url":
                    target: str = f"s3://{BUCKET}/stall"
                    kwargs.update(storage_options=options(endpoint), local_dir=os.path.join(tmp, "stall_url"))
                else:
                    target = os.path.join(tmp, "stall_local")
                ckpt = Checkpointer(target, **kwargs)
                for step in range(args.saves):
                    t0 = time.perf_counter()
                    ckpt.save(step, state)
                    blocked[kind].append(time.perf_counter() - t0)
                    state["w"].add_(1)
                ckpt.close()
            stall = {f"{k}_blocking_p50_ms": statistics.median(v) * 1e3 for k, v in blocked.items()}
    finally:
        proc.kill()
        proc.wait()
    tier_mib = nbytes / statistics.median(tier_s) / MiB
    put_mib = nbytes / statistics.median(put_s) / MiB
    return {
        "bytes": nbytes,
        "part_size_mib": args.part_size,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "uploader_s": tier_s,
        "put_file_s": put_s,
        "uploader_mib_s": tier_mib,
        "put_file_mib_s": put_mib,
        "ratio": tier_mib / put_mib,
        "uploader_phases_s": phases,
        **stall,
        "server": "moto (loopback, subprocess)",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", default=True, help="the default: 64 MiB, 3 rounds")
    p.add_argument("--size", type=int, default=64, help="MiB per checkpoint file")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--part-size", type=int, default=8, help="MiB per multipart part (>= 5)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--stall-size", type=int, default=32, help="MiB of state for the stall comparison")
    p.add_argument("--saves", type=int, default=5, help="saves per stall measurement")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    result = run(args)
    print("| side | median s | MiB/s |\n|---|---|---|")
    print(
        f"| uploader (CRC + upload + publish) | {statistics.median(result['uploader_s']):.3f} | "
        f"{result['uploader_mib_s']:.0f} |"
    )
    print(f"| s3fs put_file | {statistics.median(result['put_file_s']):.3f} | {result['put_file_mib_s']:.0f} |")
    print(f"\nratio uploader / put_file: {result['ratio']:.2f}")
    ph = {k: statistics.median(v) for k, v in result["uploader_phases_s"].items()}
    rest = statistics.median(result["uploader_s"]) - sum(ph.values())
    print(
        f"uploader phases (medians): CRC-32 read {ph['checksum_s'] * 1e3:.0f} ms, multipart upload "
        f"{ph['upload_s'] * 1e3:.0f} ms, size check + manifest {ph['publish_s'] * 1e3:.0f} ms, hand-over and "
        f"the rest {rest * 1e3:.0f} ms; s3fs put_file {statistics.median(result['put_file_s']) * 1e3:.0f} ms"
    )
    local, url = result["local_blocking_p50_ms"], result["url_blocking_p50_ms"]
    print(f"save() blocking p50: local {local:.1f} ms, URL {url:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
