"""Bounded overload test on loopback: about twice the sustainable rate, for a fixed time.

This process is the load generator; the server is a real ``python -m service`` child with a small
queue. First a closed loop (4 clients) measures the rate the server sustains; then requests are
fired open-loop at ``--factor`` times that rate for ``--duration`` seconds. Expected: every
accepted request succeeds with a bounded p99, the excess is refused 503 with Retry-After, nothing
else happens, and the server's memory returns near its level before the overload.

    .venv/bin/python -m benchmarks.load_test --repository DIR [--model NAME] [--duration 20]

Exit status 1 when a request failed in any other way or nothing was refused.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from PIL import Image
from skimage import data

from tests.servers import SegserveServer

CALIBRATION_CLIENTS = 4


async def calibrate(client: httpx.AsyncClient, body: bytes, params: dict, seconds: float) -> float:
    """Sustainable rate (requests/s) of a closed loop with a few clients."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            response = await client.post("/segment", params=params, files={"image": body})
            response.raise_for_status()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CALIBRATION_CLIENTS)))
    return done / (time.perf_counter() - started)


async def overload(
    client: httpx.AsyncClient,
    body: bytes,
    params: dict,
    rate: float,
    seconds: float,
    rss: list[int],
    pid: int,
) -> list[tuple[str, float]]:
    """Open loop: one request every 1/rate s regardless of answers; (outcome, latency) each."""
    count = max(1, round(rate * seconds))
    outcomes: list[tuple[str, float]] = []
    server = psutil.Process(pid)

    async def one(delay: float) -> None:
        await asyncio.sleep(delay)
        started = time.perf_counter()
        try:
            response = await client.post("/segment", params=params, files={"image": body})
        except httpx.HTTPError as exc:
            outcomes.append((f"transport error {type(exc).__name__}", 0.0))
            return
        latency = time.perf_counter() - started
        if response.status_code == 503 and "retry-after" in response.headers:
            outcomes.append(("refused", latency))
        elif response.status_code == 200:
            outcomes.append(("accepted", latency))
        else:
            outcomes.append((f"status {response.status_code}", latency))
        rss.append(server.memory_info().rss)

    await asyncio.gather(*(one(i / rate) for i in range(count)))
    return outcomes


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="segserve-load-"))
    server = SegserveServer(
        args.repository,
        work / "server.log",
        intra_op_threads=0,
        max_batch_size=args.batch,
        max_queue_size=args.queue,
    )
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="JPEG", quality=90)
    body = buffer.getvalue()
    params = {"model": args.model} if args.model else {}
    try:
        server.wait_ready(timeout_s=300)
        process = psutil.Process(server.process.pid)
        rss_start = process.memory_info().rss
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            rate = await calibrate(client, body, params, args.calibrate)
            rss_before = process.memory_info().rss
            target = args.factor * rate
            print(
                f"sustainable: {rate:.2f} req/s; offering {target:.2f} req/s for {args.duration} s"
            )
            rss_during: list[int] = []
            started = time.perf_counter()
            outcomes = await overload(
                client, body, params, target, args.duration, rss_during, server.process.pid
            )
            elapsed = time.perf_counter() - started
            await asyncio.sleep(args.settle)
            rss_after = process.memory_info().rss
            healthy = (await client.get("/readyz")).status_code == 200
    finally:
        server.terminate()

    kinds = Counter(kind for kind, _ in outcomes)
    accepted = [latency for kind, latency in outcomes if kind == "accepted"]
    others = {kind: n for kind, n in kinds.items() if kind not in ("accepted", "refused")}
    mib = 1024 * 1024
    peak = max(rss_during, default=0)
    print(
        f"sent {len(outcomes)} in {elapsed:.1f} s; accepted {kinds['accepted']}, "
        f"refused 503 {kinds['refused']}, other {sum(others.values())} {others or ''}"
    )
    if accepted:
        p50, p99 = statistics.median(accepted), percentile(accepted, 0.99)
        print(
            f"accepted latency: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
            f"goodput {len(accepted) / elapsed:.2f} req/s"
        )
    print(
        f"server RSS: warm {rss_start / mib:.0f} MiB, "
        f"after calibration {rss_before / mib:.0f} MiB, peak {peak / mib:.0f} MiB, "
        f"after {args.settle:.0f} s {rss_after / mib:.0f} MiB; ready after: {healthy}"
    )
    return 0 if not others and kinds["refused"] > 0 and healthy else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="model repository")
    parser.add_argument("--model", help="bundle name (default: the server's default)")
    parser.add_argument("--duration", type=float, default=20.0, help="overload seconds")
    parser.add_argument("--calibrate", type=float, default=10.0, help="calibration seconds")
    parser.add_argument("--factor", type=float, default=2.0, help="offered / sustainable rate")
    parser.add_argument("--batch", type=int, default=4, help="SEGSERVE_MAX_BATCH_SIZE")
    parser.add_argument("--queue", type=int, default=4, help="SEGSERVE_MAX_QUEUE_SIZE (inputs)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before the last RSS")
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
