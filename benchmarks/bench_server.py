"""Load test of `apex serve` on loopback: throughput, latency, bursts, stalled clients, bad requests.

    python benchmarks/bench_server.py [--requests 120] [--concurrency 1,8,50] [--bursts 3]
                                      [--stalled 200] [--trickling 40] [--threads 32] [--timeout 2]
                                      [--json FILE]

Starts `apex serve --objectives brightness` (a cheap reward, so the server itself is measured,
not a model) as a child process bound to 127.0.0.1 on a free port, and stops it at the end.
Every phase is bounded (a fixed number of requests, each with a client timeout):
1. throughput: `--requests` POST /score (4 PNGs of 64x64 each) at each concurrency; requests/s,
   p50/p95 latency, failures;
2. bursts: 50 connections opened at once, `--bursts` times; failures (resets) per burst;
3. stalled clients: `--stalled` connections that send nothing; the server's thread count
   (from /proc) while they are held, how many the server closed, and the latency of one
   valid request queued behind them (a waiting connection drops the oldest silent one after
   the server's header grace, so about 1 s, not ceil(stalled / threads) x timeout);
4. trickling clients: `--trickling` connections that each send one header byte every 0.5 s
   (each read returns, so no per-read timeout fires); the latency of one valid request
   sent while they trickle, and how many the server dropped;
5. malformed JSON bodies: their status codes (all must be 4xx).
Nothing leaves the machine: the server and every client use 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

HOST = "127.0.0.1"  # loopback only, by design
CLIENT_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def png_b64(seed: int, size: int = 64) -> str:
    img = Image.frombytes("RGB", (size, size), bytes((seed * 37 + i) % 256 for i in range(size * size * 3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def body(n_images: int = 4) -> bytes:
    return json.dumps(
        {"objectives": ["brightness"], "prompts": ["x"] * n_images, "images": [png_b64(i) for i in range(n_images)]}
    ).encode()


def post(url: str, data: bytes) -> tuple[int | str, float]:
    """(HTTP status or exception name, seconds) of one POST /score."""
    start = time.perf_counter()
    req = urllib.request.Request(url + "/score", data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=CLIENT_TIMEOUT_S) as resp:
            resp.read()
            code: int | str = resp.status
    except urllib.error.HTTPError as exc:
        code = exc.code
    except OSError as exc:
        code = type(exc).__name__
    return code, time.perf_counter() - start


def server_threads(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("Threads:"))
    except (OSError, StopIteration):
        return -1  # not Linux


def start_server(threads: int, timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "apexcli",
        "serve",
        "--objectives",
        "brightness",
        "--host",
        HOST,
        "--port",
        str(port),
        "--device",
        "cpu",
        "--threads",
        str(threads),
        "--timeout",
        str(timeout),
    ]
    env = dict(os.environ)
    env.pop("APEX_SERVE_TOKEN", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"apex serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("apex serve did not answer /health within 180 s")


def throughput(url: str, concurrency: int, n: int, data: bytes) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: post(url, data), range(n)))
    wall = time.perf_counter() - start
    lat = sorted(t for _, t in results)
    return {
        "concurrency": concurrency,
        "requests": n,
        "ok": sum(c == 200 for c, _ in results),
        "req_per_s": n / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p95_ms": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))],
    }


def burst(url: str, n: int, data: bytes) -> int:
    """Failures among n requests whose connections open at the same moment."""
    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait(timeout=60)
        return post(url, data)[0]

    with ThreadPoolExecutor(n) as pool:
        return sum(code != 200 for code in pool.map(one, range(n)))


def stalled_clients(url: str, pid: int, n: int, data: bytes) -> dict:
    host, port = url.rsplit("/", 1)[-1].split(":")
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=CLIENT_TIMEOUT_S)
        socks.append(s)
    peak = server_threads(pid)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(post, url, data)
        while not future.done():  # bounded by the request's own client timeout
            peak = max(peak, server_threads(pid))
            time.sleep(0.05)
        code, seconds = future.result()
    closed = 0
    for s in socks:
        s.settimeout(CLIENT_TIMEOUT_S)
        try:
            closed += s.recv(1) == b""
        except ConnectionResetError:
            closed += 1
        except OSError:
            pass
        s.close()
    return {
        "stalled": n,
        "peak_server_threads": peak,
        "closed_by_server": closed,
        "queued_request_status": code,
        "queued_request_s": seconds,
    }


def trickling_clients(url: str, n: int, data: bytes) -> dict:
    """`n` connections sending a header byte every 0.5 s (at most 240 each: two minutes), and one
    valid request sent among them."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    stop = threading.Event()
    dropped = []

    def closed_by_server(sock: socket.socket) -> bool:
        sock.setblocking(False)
        try:
            return sock.recv(1) == b""
        except BlockingIOError:
            return False  # still open, nothing to read
        except OSError:
            return True

    def trickle(sock: socket.socket) -> None:
        try:
            for i in range(240):
                if stop.wait(0.5):
                    break
                sock.sendall(b"POST /score HTTP/1.0\r\nX-Pad: "[i : i + 1] or b"a")
            if closed_by_server(sock):
                dropped.append(sock)
        except OSError:
            dropped.append(sock)
        finally:
            sock.close()

    socks = [socket.create_connection((host, int(port)), timeout=CLIENT_TIMEOUT_S) for _ in range(n)]
    threads = [threading.Thread(target=trickle, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    try:
        code, seconds = post(url, data)
    finally:
        stop.set()
        for t in threads:
            t.join(CLIENT_TIMEOUT_S)
    return {"trickling": n, "request_status": code, "request_s": seconds, "dropped_by_server": len(dropped)}


MALFORMED = [
    b"[]",
    b"null",
    b'"x"',
    b'{"objectives": 3}',
    b'{"images": [1], "prompts": ["x"]}',
    b"[" * 100_000 + b"]" * 100_000,
    b"{not json",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=120, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,8,50")
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--stalled", type=int, default=200)
    ap.add_argument("--trickling", type=int, default=40)
    ap.add_argument("--threads", type=int, default=32, help="apex serve --threads")
    ap.add_argument(
        "--timeout", type=float, default=2.0, help="apex serve --timeout (short, to see stalled clients go)"
    )
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if not (
        1 <= args.requests <= 10_000
        and 0 <= args.stalled <= 1000
        and 0 <= args.bursts <= 20
        and 0 <= args.trickling <= 1000
    ):
        raise SystemExit("keep it bounded: --requests 1..10000, --stalled 0..1000, --trickling 0..1000, --bursts 0..20")

    proc, url = start_server(args.threads, args.timeout)
    data = body()
    results: dict = {"server": {"threads": args.threads, "timeout_s": args.timeout, "pid": proc.pid}}
    try:
        results["idle_server_threads"] = server_threads(proc.pid)
        post(url, data)  # warm-up
        results["throughput"] = [throughput(url, int(c), args.requests, data) for c in args.concurrency.split(",")]
        results["burst_failures"] = [burst(url, 50, data) for _ in range(args.bursts)]
        results["stalled"] = stalled_clients(url, proc.pid, args.stalled, data) if args.stalled else None
        results["trickling"] = trickling_clients(url, args.trickling, data) if args.trickling else None
        results["malformed_status"] = sorted({post(url, b)[0] for b in MALFORMED}, key=str)
        results["after_status"] = post(url, data)[0]  # still serving
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    print(
        f"apex serve on {HOST}, brightness, 4 PNGs 64x64 per request, --threads {args.threads} --timeout {args.timeout}"
    )
    print("| concurrency | requests | ok | req/s | p50 ms | p95 ms |")
    print("|---|---|---|---|---|---|")
    for r in results["throughput"]:
        print(
            f"| {r['concurrency']} | {r['requests']} | {r['ok']} | {r['req_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |"
        )
    print(f"bursts of 50 simultaneous connections: failures per burst {results['burst_failures']}")
    if results["stalled"]:
        s = results["stalled"]
        print(
            f"{s['stalled']} stalled connections: server threads idle {results['idle_server_threads']}, peak "
            f"{s['peak_server_threads']}; {s['closed_by_server']}/{s['stalled']} closed by the server; a request "
            f"queued behind them answered {s['queued_request_status']} after {s['queued_request_s']:.1f} s"
        )
    if results["trickling"]:
        t = results["trickling"]
        print(
            f"{t['trickling']} trickling connections: a request sent among them answered {t['request_status']} "
            f"after {t['request_s']:.1f} s; {t['dropped_by_server']} of them dropped by the server"
        )
    print(
        f"malformed bodies answered {results['malformed_status']}; afterwards a valid request: {results['after_status']}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
