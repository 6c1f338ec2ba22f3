"""Classify latency and throughput of the REST service beside a plain FastAPI server, and during version swaps.

Starts a private local Ray with the gnsp service on 127.0.0.1 over a fresh store, and in the same
run a plain server: one uvicorn process with a FastAPI route that holds the same stored version in
memory and classifies each request on its own (the same decode and forward code, a cached text
head, no Ray, no batching: what a user would write instead). Both get the same requests, POST
/v1/classify with one 224-px image (a held-out photo as JPEG, or `--image noise`, a 150 KB PNG of
random pixels) as base64 JSON and 10 free-text labels, from 1, 8 and 32 concurrent clients, each
sending its next request when the last one is answered; the table gives gnsp's p50 and throughput
as ratios of the plain server's. The in-process numbers are `ServedModel.classify` of the same
version on one request in this process, on the model as loaded (what the plain server runs) and
on the image tower as the classifier serves it (batch norms folded, channels-last), and on 16
requests at once (the most that preparing the tower and batching the forward can win on this
hardware together, `forward ceiling`). The swap run keeps 8 clients going while
the active version is moved between two stored versions (version 2 is version 1's state stored
again, so the first swaps make the classifier load a model it does not hold yet); every non-200
answer counts as a failure. Each gnsp answer's Server-Timing header (time in the HTTP handler,
in the classifier, in its batch's forward, and the batch's size) splits its latency and shows how
large the batches really were.

    python benchmarks/serve_load.py --model tiny --seconds 5          # quick
    python benchmarks/serve_load.py --seconds 8 --out out/serve_load   # gnsp-mini (the default)
    python benchmarks/serve_load.py --gpus 1 --out out/serve_load_gpu  # the classifier on a GPU

Prints a markdown table and writes serve_load.json and serve_load.png to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from service.serving.haproxy import INGRESSES, use_ingress

from plain_server import free_port, plain_server

LABELS = ["a dog", "a cat", "a car", "a tree", "a house", "a bird", "a boat", "a flower", "a chair", "a shoe"]
CLIENTS = (1, 8, 32)
GNSP, PLAIN = "gnsp", "plain FastAPI"


def noise_png(seed: int = 0, size: int = 224) -> bytes:
    """Random pixels: incompressible, so the worst case for payload size (about 150 KB)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def photo_jpeg(size: int = 224) -> bytes:
    """A real photo (the first held-out one) at 224 px, as a client would send it (about 20 KB)."""
    from gnsp_core.data.reference import heldout_eval_samples

    buffer = io.BytesIO()
    heldout_eval_samples()[0][0].convert("RGB").resize((size, size)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


IMAGES = {"photo": photo_jpeg, "noise": noise_png}


HOPS = ("ingress", "classifier", "forward")


def summary(latencies: list[float], timings: list[dict[str, float]], failures: int, seconds: float) -> dict[str, Any]:
    ms = sorted(1000 * x for x in latencies)
    def pick(q: float) -> float:
        return ms[min(len(ms) - 1, int(q * len(ms)))] if ms else float("nan")

    hops = {f"{hop}_ms": statistics.median(t[hop] for t in timings) if timings else float("nan") for hop in HOPS}
    return {"requests": len(ms), "failures": failures, "p50_ms": pick(0.50), "p99_ms": pick(0.99),
            "throughput_rps": len(ms) / seconds, **hops,
            "mean_batch": statistics.fmean(t["batch"] for t in timings) if timings else float("nan")}


async def load(url: str, clients: int, seconds: float, body: dict, during=None) -> dict[str, Any]:
    """`clients` closed-loop clients for `seconds`; `during` (a coroutine function) runs alongside."""
    from service.serving.classify_http import parse_server_timing

    latencies: list[float] = []
    timings: list[dict[str, float]] = []
    failures = 0
    deadline = 0.0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                response = await http.post("/v1/classify", json=body)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
                if "server-timing" in response.headers:  # gnsp's; the plain server sends none
                    timings.append(parse_server_timing(response.headers["server-timing"]))
            else:
                failures += 1

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await http.post("/v1/classify", json=body)  # warm: version loaded, text head cached
        begin = time.perf_counter()
        deadline = begin + seconds
        extra = [asyncio.create_task(during(http, deadline))] if during else []
        await asyncio.gather(*(client(http) for _ in range(clients)), *extra)
        elapsed = time.perf_counter() - begin
    return summary(latencies, timings, failures, elapsed)


def swapper(versions: tuple[int, int], every_s: float):
    async def swap(http: httpx.AsyncClient, deadline: float) -> None:
        swaps = 0
        while time.perf_counter() < deadline:
            await asyncio.sleep(every_s)
            response = await http.post(f"/v1/models/{versions[swaps % 2]}/activate")
            response.raise_for_status()
            swaps += 1
        swap.count = swaps
    swap.count = 0
    return swap


def in_process_ms(store, version: int, body: dict, threads: int, batch: int = 1, repeats: int = 30,
                  prepare: bool = False) -> float:
    """Median time per request of the same classification in this process (decode, preprocess,
    image tower, head), answering `batch` requests in one call, with a decode pool of `threads` as
    in the classifier; with `prepare`, on the image tower as the classifier serves it (batch norms
    folded, channels-last), else on the model as loaded (what the plain server runs)."""
    import base64
    from concurrent.futures import ThreadPoolExecutor

    from gnsp_core.zeroshot import TextHeadCache
    from service.serving.served_model import load_served_model

    served = load_served_model(store, version, Path(tempfile.mkdtemp()), prepare=prepare)
    requests = [{"images": [base64.b64decode(i) for i in body["images"]], "labels": body["labels"]}] * batch
    heads = TextHeadCache(8)
    times = []
    with ThreadPoolExecutor(threads) as pool:
        served.classify(requests, heads, pool)
        for _ in range(max(3, repeats // batch)):
            start = time.perf_counter()
            served.classify(requests, heads, pool)
            times.append((time.perf_counter() - start) / batch)
    return 1000 * statistics.median(times)


def add_copy_of_version(store, version: int) -> int:
    """Store `version`'s state again as a new version: a second model for the classifier to load."""
    folder = store.fetch_version(version, Path(tempfile.mkdtemp()))
    manifest = {**store.manifest(version), "parent": version, "task": None, "note": "serve_load copy"}
    return store.publish_version(folder, manifest)


def measure(servers: dict[str, str], body: dict, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each client count on each server in turn (gnsp, plain, gnsp, ...), so that a change in the
    machine's other load during the run touches both sides of a ratio alike."""
    rows = []
    for url in servers.values():
        asyncio.run(load(url, 8, args.warmup, body))  # unmeasured: caches warm, helper processes settled
    for clients in CLIENTS:
        for name, url in servers.items():
            result = asyncio.run(load(url, clients, args.seconds, body))
            rows.append({"setting": name, "clients": clients, **result})
            print(f"  {name:14s} {clients:3d} clients: p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} "
                  f"ms, {result['throughput_rps']:.1f} req/s, {result['failures']} failed", file=sys.stderr)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    import base64

    import ray
    from ray import serve

    from service.api.app import deploy_service
    from service.serving.classifier import classifier_thread_count
    from service.settings import ServiceSettings
    from service.store import ModelStore

    image = IMAGES[args.image]()
    body = {"images": [base64.b64encode(image).decode()], "labels": LABELS}
    work = Path(tempfile.mkdtemp(prefix="gnsp-serve-load-"))
    load_start = os.getloadavg()
    cpus = args.num_cpus or os.cpu_count() or 1
    use_ingress(args.ingress)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    port = args.port or free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServiceSettings(store=str(work / "store"), model=args.model, heldout=None, reference=None,
                               work_dir=str(work), max_batch_size=args.max_batch, batch_wait_timeout_s=args.batch_wait,
                               busy_batch_wait_max_s=args.busy_batch_wait_max, classifier_cpus=args.classifier_cpus
                               or cpus, classifier_threads=args.classifier_threads, classifier_gpus=args.gpus)
    try:
        deploy_service(settings, "gnsp")
        store = ModelStore.open(settings.store)
        threads = classifier_thread_count(settings)
        baseline = in_process_ms(store, 1, body, threads)
        prepared = in_process_ms(store, 1, body, threads, prepare=True)
        batched = in_process_ms(store, 1, body, threads, batch=16, prepare=True)
        print(f"in-process: {baseline:.1f} ms per request alone as loaded, {prepared:.1f} ms prepared for serving, "
              f"{batched:.1f} ms in a batch of 16 prepared", file=sys.stderr)
        url = f"http://127.0.0.1:{port}"
        with plain_server(settings.store, 1, free_port()) as plain:
            rows = measure({GNSP: url, PLAIN: plain}, body, args)
        second = add_copy_of_version(store, 1)
        swap = swapper((second, 1), args.swap_every)
        result = asyncio.run(load(url, 8, args.seconds, body, during=swap))
        rows.append({"setting": f"{GNSP}, swapping versions ({swap.count} swaps)", "clients": 8, **result})
        print(f"  swapping: {swap.count} swaps, {result['failures']} failed", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return {"model": args.model or "gnsp-mini", "ingress": "HAProxy" if args.ingress == "haproxy" else "Serve's proxy", "image": args.image, "image_bytes": len(image), "cpus": cpus,
            "load_average": load_start, "load_average_end": os.getloadavg(), "in_process_ms": baseline,
            "in_process_prepared_ms": prepared, "in_process_batched_ms": batched, "forward_ceiling": baseline / batched,
            "rows": rows, "seconds_per_point": args.seconds,
            "ratios": ratios(rows), **targets(rows)}


def row(rows: list[dict], setting: str, clients: int) -> dict:
    return next(r for r in rows if r["setting"] == setting and r["clients"] == clients)


def ratios(rows: list[dict]) -> list[dict[str, Any]]:
    """gnsp against the plain server at each client count: p50 (lower is better) and req/s (higher)."""
    out = []
    for clients in CLIENTS:
        gnsp, plain = row(rows, GNSP, clients), row(rows, PLAIN, clients)
        out.append({"clients": clients, "p50_ratio": gnsp["p50_ms"] / plain["p50_ms"],
                    "throughput_ratio": gnsp["throughput_rps"] / plain["throughput_rps"]})
    return out


def targets(rows: list[dict]) -> dict[str, Any]:
    """p50 at 1 client <= 1.10x the plain server's; throughput at 8 and 32 clients >= 1.3x; 0 failed swaps."""
    by_clients = {r["clients"]: r for r in ratios(rows)}
    return {"p50_target_met": by_clients[1]["p50_ratio"] <= 1.10,
            "throughput_target_met": all(by_clients[c]["throughput_ratio"] >= 1.3 for c in (8, 32)),
            "swap_failures": sum(r["failures"] for r in rows if "swapping" in r["setting"])}


def table(result: dict[str, Any]) -> str:
    load1, load5, _ = result["load_average"]
    end1, end5, _ = result["load_average_end"]
    lines = [f"model {result['model']}, ingress {result['ingress']}; image {result['image']} ({result['image_bytes'] / 1024:.0f} KB); "
             f"{result['cpus']} CPUs, load average (1 / 5 min) {load1:.1f} / {load5:.1f} at the start, "
             f"{end1:.1f} / {end5:.1f} at the end; "
             f"in-process {result['in_process_ms']:.1f} ms per request alone as loaded, "
             f"{result['in_process_prepared_ms']:.1f} ms prepared for serving, "
             f"{result['in_process_batched_ms']:.1f} ms in a batch of 16 (forward ceiling "
             f"{result['forward_ceiling']:.2f}x)", "",
             "| clients | gnsp p50 ms | plain p50 ms | p50 ratio | gnsp req/s | plain req/s | req/s ratio |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for ratio in result["ratios"]:
        gnsp, plain = row(result["rows"], GNSP, ratio["clients"]), row(result["rows"], PLAIN, ratio["clients"])
        lines.append(f"| {ratio['clients']} | {gnsp['p50_ms']:.1f} | {plain['p50_ms']:.1f} | {ratio['p50_ratio']:.2f} | "
                     f"{gnsp['throughput_rps']:.1f} | {plain['throughput_rps']:.1f} | {ratio['throughput_ratio']:.2f} |")
    lines += ["", "| setting | clients | requests | failed | p50 ms | p99 ms | req/s | mean batch |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['setting']} | {r['clients']} | {r['requests']} | {r['failures']} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['throughput_rps']:.1f} | {r['mean_batch']:.1f} |")
    lines += ["", "Where gnsp's time goes (medians, ms, from its Server-Timing header): proxy + HTTP = client p50 - "
                  "handler; handler = reading and checking the request; queue + decode = time in the classifier "
                  "outside the batch's forward.", "",
              "| setting | clients | client p50 | proxy + HTTP | handler | queue + decode | forward |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["setting"].startswith(GNSP):
            lines.append(f"| {r['setting']} | {r['clients']} | {r['p50_ms']:.1f} | {r['p50_ms'] - r['ingress_ms']:.1f} | "
                         f"{r['ingress_ms'] - r['classifier_ms']:.1f} | {r['classifier_ms'] - r['forward_ms']:.1f} | "
                         f"{r['forward_ms']:.1f} |")
    lines += ["", f"p50 at 1 client <= 1.10x plain: {'met' if result['p50_target_met'] else 'NOT met'}; "
                  f"throughput at 8 and 32 clients >= 1.3x plain: "
                  f"{'met' if result['throughput_target_met'] else 'NOT met'}; "
                  f"failed requests during version swaps: {result['swap_failures']}"]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for setting in (GNSP, PLAIN):
        rows = [r for r in result["rows"] if r["setting"] == setting]
        clients = [r["clients"] for r in rows]
        left.plot(clients, [r["throughput_rps"] for r in rows], marker="o", label=setting)
        right.plot(clients, [r["p99_ms"] for r in rows], marker="o", label=f"{setting} p99")
        right.plot(clients, [r["p50_ms"] for r in rows], marker="x", linestyle="--", label=f"{setting} p50")
    right.axhline(result["in_process_ms"], color="grey", linestyle=":", label="in-process forward")
    for axis, title in ((left, "throughput (req/s)"), (right, "latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_title(title)
        axis.legend(fontsize=7)
    fig.suptitle(f"POST /v1/classify, {result['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="open_clip name or 'tiny'; left out: gnsp-mini")
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration of each point")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured load before each setting (s)")
    parser.add_argument("--batch-wait", type=float, default=0.0, help="batch wait when the classifier is idle (s)")
    parser.add_argument("--busy-batch-wait-max", type=float, default=0.25,
                        help="most a batch waits to fill while others are in the classifier (s); 0: off")
    parser.add_argument("--image", choices=sorted(IMAGES), default="photo", help="what each request sends")
    parser.add_argument("--swap-every", type=float, default=1.0, help="seconds between version swaps")
    parser.add_argument("--ingress", choices=INGRESSES, default="haproxy",
                        help="haproxy: Serve's HAProxy ingress, gnsp serve's default; proxy: Serve's Python proxy")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the private Ray; default: all cores")
    parser.add_argument("--classifier-cpus", type=float, default=0,
                        help="CPUs Ray reserves for the classifier (its torch threads); 0: all of Ray's")
    parser.add_argument("--classifier-threads", type=int, default=0,
                        help="torch threads of the classifier; 0: its CPUs")
    parser.add_argument("--max-batch", type=int, default=16, help="images in one classifier forward")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs for the classifier replica (e.g. 1)")
    parser.add_argument("--port", type=int, default=0, help="gnsp's HTTP port; 0: a free one")
    parser.add_argument("--out", type=Path, default=Path("out/serve_load"))
    args = parser.parse_args()
    result = run(args)
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "serve_load.png")
    print(f"\nwrote {args.out / 'serve_load.json'} and {args.out / 'serve_load.png'}")


if __name__ == "__main__":
    main()
