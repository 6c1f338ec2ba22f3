"""The REST service under hostile clients: each attack's answer, and what a well-behaved neighbour sees.

Starts a private local Ray with the gnsp app on 127.0.0.1 (gnsp-mini, or `--model tiny` for a
quick run) with an API token set, and stores copies of version 1 as versions 2 to 5 (old versions
a client may pin). A neighbour classifies one small JPEG over 5 labels in a closed loop, first
alone (its quiet p99), then during each attack. For each attack the table gives the status the
attacker got and how long it took, the neighbour's failures and p99 during the attack (and as a
multiple of the quiet p99), and the peak resident memory of the service's processes (every
process of this Ray session, sampled every 0.1 s) above the idle level measured before the
attacks. Targets: every attack answered 4xx within 2 s, 0 neighbour failures, neighbour p99 at
most 3x quiet, peak memory at most 1 GiB above idle. Every request and loop is bounded in count
and time, and only 127.0.0.1 is contacted. Attacks that the service accepts (a 202 task) are
cancelled at once, so no training runs behind the measurements.

    python benchmarks/hostile.py --model tiny                # quick (about 3 minutes)
    python benchmarks/hostile.py --out out/hostile           # gnsp-mini (the default model)

Prints a markdown table and writes hostile.json to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from service.serving.haproxy import INGRESSES, use_ingress

from hostile_attacks import ATTACKS, TOKEN, Attack, payloads, status_of

ANSWER_TARGET_S = 2.0
P99_FACTOR = 3.0
MEMORY_TARGET = 1024**3


# ------------------------------------------------------------------------- measurements


class MemorySampler:
    """Peak summed RSS of this process's descendants (this Ray session: GCS, raylet, every worker)."""

    def __init__(self, every_s: float = 0.1) -> None:
        import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
        import psutil

        self.psutil, self.every_s = psutil, every_s
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        total = 0
        for child in self.psutil.Process(os.getpid()).children(recursive=True):
            try:
                if "ray" not in " ".join(child.cmdline()):  # the neighbour's own process is not the service
                    continue
                total += child.memory_info().rss
            except self.psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.rss())

    def reset(self) -> int:
        self.peak = self.rss()
        return self.peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def p99(latencies: list[float]) -> float:
    ms = sorted(1000 * x for x in latencies)
    return ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else float("nan")


def neighbour(url: str, body: dict, seconds: float, stop: Any, results: Any) -> None:
    """A well-behaved client in its own process (so the attacker's client work never delays its
    loop): one request at a time until `stop` is set (at most `seconds`); puts (latencies in s,
    failure kinds, the Server-Timing header of the slowest answer) on `results`."""
    async def loop() -> tuple[list[float], list[str], str]:
        latencies: list[float] = []
        failures: list[str] = []
        slowest = ""
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end and not stop.is_set():
                start = time.perf_counter()
                try:
                    response = await http.post("/v1/classify", json=body)
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - start)
                        if latencies[-1] >= max(latencies):
                            slowest = response.headers.get("server-timing", "")
                    else:
                        failures.append(status_of(response))
                except httpx.HTTPError as exc:
                    failures.append(type(exc).__name__)
        return latencies, failures, slowest

    results.put(asyncio.run(loop()))


class NeighbourProcess:
    """`neighbour` started in a child process; `result()` stops it and returns its latencies and failures."""

    def __init__(self, url: str, body: dict, seconds: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.results, self.stop = context.Queue(), context.Event()
        self.process = context.Process(target=neighbour, args=(url, body, seconds, self.stop, self.results),
                                       daemon=True)
        self.process.start()

    def result(self, timeout_s: float, stop: bool = True) -> tuple[list[float], list[str], str]:
        if stop:
            self.stop.set()
        try:
            return self.results.get(timeout=timeout_s)
        finally:
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()


def warm(url: str, body: dict) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(3):
            http.post("/v1/classify", json=body)  # the version loaded, the head cached


def under_attack(url: str, attack: Attack, p: dict, window_s: float, timeout_s: float) -> dict[str, Any]:
    """The attack beside the neighbour, which runs `window_s` seconds or until the attack has been
    answered (the attack starts 1 s in)."""
    neighbour_run = NeighbourProcess(url, p["good"], window_s + timeout_s)
    time.sleep(1.0)  # the child process starts and sends its first requests

    async def attacked() -> tuple[str, float]:
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as attacker:
            start = time.perf_counter()
            try:
                answer = await asyncio.wait_for(_answer(attacker, attack, p), timeout_s)
            except asyncio.TimeoutError:
                answer = f"no answer in {timeout_s:g} s"
            return answer, time.perf_counter() - start

    answer, took = asyncio.run(attacked())
    time.sleep(max(0.0, window_s - 1.0 - took))
    latencies, failures, slowest = neighbour_run.result(timeout_s + window_s + 30)
    return {"answer": answer, "answer_s": took, "neighbour_requests": len(latencies) + len(failures),
            "neighbour_failures": len(failures), "neighbour_failure_kinds": sorted(set(failures)),
            "neighbour_p99_ms": p99(latencies), "neighbour_slowest": slowest_split(latencies, slowest)}


def slowest_split(latencies: list[float], server_timing: str) -> dict[str, float]:
    """Where the neighbour's slowest answer spent its time (ms): in the classifier replica's handler
    (`replica`, of which `classifier` after the body was read and checked, `forward` in its
    batch's forward and `pass` in its image-tower passes) and outside it (`outside`: the ingress
    proxy, the network and the client), from the answer's Server-Timing header."""
    from service.serving.classify_http import parse_server_timing

    if not latencies or not server_timing:
        return {}
    timing = parse_server_timing(server_timing)
    total = 1000 * max(latencies)
    return {"total": total, "replica": timing["ingress"], "classifier": timing["classifier"],
            "forward": timing["forward"], "pass": timing.get("pass", 0.0), "batch": timing["batch"],
            "outside": total - timing["ingress"]}


async def _answer(http: httpx.AsyncClient, attack: Attack, p: dict) -> str:
    result = await attack(http, p)
    return status_of(result) if isinstance(result, httpx.Response) else result


# ------------------------------------------------------------------------------------ run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from service.api.app import deploy_service
    from service.settings import ServiceSettings
    from service.store import ModelStore
    from serve_load import add_copy_of_version  # a sibling script: old versions a client may pin
    from rest_task import wait_primed

    p = payloads()
    work = Path(tempfile.mkdtemp(prefix="gnsp-hostile-"))
    use_ingress(args.ingress)
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = args.port or free_port()  # after Ray has taken its own ports (its agent listens on 52365)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    settings = ServiceSettings(store=str(work / "store"), model=args.model, heldout=None, reference=None,
                               work_dir=str(work), api_token=TOKEN)
    rows = []
    try:
        deploy_service(settings, "gnsp")
        store = ModelStore.open(settings.store)
        for _ in range(4):
            add_copy_of_version(store, 1)
        with httpx.Client(base_url=url, timeout=30) as http:
            primed_s = wait_primed(http)  # the node's priming (a model load) is over before anything is timed
        memory = MemorySampler()
        warm(url, p["good"])
        quiet_latencies, _, _ = NeighbourProcess(url, p["good"], args.quiet).result(args.quiet + 60, stop=False)
        idle = memory.reset()
        quiet_p99 = p99(quiet_latencies)
        print(f"quiet: {len(quiet_latencies)} requests, p99 {quiet_p99:.1f} ms; idle RSS {idle / 2**20:.0f} MiB",
              flush=True)
        for name, attack in ATTACKS.items():
            if args.only and not any(word in name for word in args.only):
                continue
            before = memory.reset()
            row = {"attack": name, **under_attack(url, attack, p, args.window, args.timeout)}
            row["peak_rss_over_idle_mib"] = (memory.peak - idle) / 2**20
            row["peak_rss_over_start_mib"] = (memory.peak - before) / 2**20
            row.update(verdict(row, quiet_p99, idle, memory.peak))
            rows.append(row)
            print(f"  {name}: {row['answer']} in {row['answer_s']:.2f} s; neighbour {row['neighbour_failures']} "
                  f"failed, p99 {row['neighbour_p99_ms']:.0f} ms", flush=True)
        memory.stop()
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return {"model": args.model or "gnsp-mini", "ingress": "HAProxy" if args.ingress == "haproxy" else "Serve's proxy",
            "primed_s": primed_s, "quiet_p99_ms": quiet_p99, "quiet_requests": len(quiet_latencies),
            "idle_rss_mib": idle / 2**20, "rows": rows,
            "targets": {"answer_4xx_within_s": ANSWER_TARGET_S, "neighbour_failures": 0,
                        "neighbour_p99_over_quiet": P99_FACTOR, "peak_rss_over_idle_mib": MEMORY_TARGET / 2**20},
            "all_met": all(row["met"] for row in rows)}


def verdict(row: dict[str, Any], quiet_p99: float, idle: int, peak: int) -> dict[str, Any]:
    status = row["answer"].split()[0]
    checks = {"answered_4xx": status.isdigit() and 400 <= int(status) < 500,
              "within_2s": row["answer_s"] <= ANSWER_TARGET_S,
              "no_neighbour_failures": row["neighbour_failures"] == 0,
              "neighbour_p99_ok": row["neighbour_p99_ms"] <= P99_FACTOR * quiet_p99,
              "memory_ok": peak - idle <= MEMORY_TARGET}
    return {"checks": checks, "met": all(checks.values()), "p99_over_quiet": row["neighbour_p99_ms"] / quiet_p99}


def table(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']}, ingress {result['ingress']}; neighbour quiet p99 {result['quiet_p99_ms']:.1f} ms "
             f"({result['quiet_requests']} requests); idle RSS {result['idle_rss_mib']:.0f} MiB", "",
             "| attack | answer | time (s) | neighbour failed | neighbour p99 ms (x quiet) | slowest: outside / "
             "replica / forward / pass ms (batch) | peak RSS over idle (over the attack's start), MiB | targets |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        missed = [name for name, ok in row["checks"].items() if not ok]
        lines.append(f"| {row['attack']} | {row['answer']} | {row['answer_s']:.2f} | {row['neighbour_failures']}/"
                     f"{row['neighbour_requests']} | {row['neighbour_p99_ms']:.0f} ({row['p99_over_quiet']:.1f}x) | "
                     f"{split_cell(row['neighbour_slowest'])} | {row['peak_rss_over_idle_mib']:.0f} ({row['peak_rss_over_start_mib']:.0f}) | {'met' if row['met'] else 'missed: ' + ', '.join(missed)} |")
    return "\n".join(lines)


def split_cell(split: dict[str, float]) -> str:
    if not split:
        return "-"
    return (f"{split['outside']:.0f} / {split['replica']:.0f} / {split['forward']:.0f} / {split['pass']:.0f} "
            f"({split['batch']:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="open_clip name or 'tiny'; left out: gnsp-mini")
    parser.add_argument("--quiet", type=float, default=5.0, help="seconds of neighbour load alone (quiet p99)")
    parser.add_argument("--window", type=float, default=4.0, help="seconds the neighbour runs per attack (the attack starts 1 s in)")
    parser.add_argument("--timeout", type=float, default=30.0, help="longest wait for any one answer (s)")
    parser.add_argument("--only", nargs="*", default=None, help="run only attacks whose name contains a word")
    parser.add_argument("--ingress", choices=INGRESSES, default="haproxy",
                        help="haproxy: Serve's HAProxy ingress, gnsp serve's default; proxy: Serve's Python proxy")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--port", type=int, default=0, help="HTTP port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--out", type=Path, default=Path("out/hostile"))
    args = parser.parse_args()
    result = run(args)
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hostile.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out / 'hostile.json'}")


if __name__ == "__main__":
    main()
