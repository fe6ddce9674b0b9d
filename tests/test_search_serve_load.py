"""Bounded load test: 32 concurrent clients for a few seconds against a real server, zero errors.

Prints p50/p99 latency (never asserted: timing depends on the machine). The full measurement is
benchmarks/bench_serve_load.py.
"""
import threading
import time

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _search_fixtures import COLORS, SHAPES, build_search_fixture, start_server  # noqa: E402

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'

CLIENTS = 32
SECONDS = 2.0


def test_32_clients_for_a_few_seconds_get_no_errors(tmp_path):
    fixture = build_search_fixture(tmp_path)
    server = start_server(fixture)
    image_bytes = open(fixture.rows.image_paths[4], "rb").read()
    latencies, failures, counts = [], [], [0] * CLIENTS
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def client(number):
        queries = [f"a {color} {shape}" for color in COLORS for shape in SHAPES]
        with httpx.Client(base_url=server.url, timeout=60) as http:
            start.wait()
            stop = time.monotonic() + SECONDS
            while time.monotonic() < stop:
                began = time.perf_counter()
                if counts[number] % 4 == 3:  # every fourth request uploads an image
                    answer = http.post("/search", files={"image": ("q.png", image_bytes, "image/png")},
                                       data={"k": "10"})
                else:
                    answer = http.get("/search", params={"q": queries[(number + counts[number]) % len(queries)],
                                                         "k": 10})
                elapsed = time.perf_counter() - began
                with lock:
                    latencies.append(elapsed)
                    if answer.status_code != 200 or not answer.json()["results"]:
                        failures.append((answer.status_code, answer.text[:200]))
                counts[number] += 1

    threads = [threading.Thread(target=client, args=(number,)) for number in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
    assert failures == []
    assert min(counts) >= 1 and not any(thread.is_alive() for thread in threads)
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    batches = [line for line in metrics.splitlines() if line.startswith("clipforge_encoder_batch_size_count")]
    print(f"\nload: {CLIENTS} clients x {SECONDS:.0f} s: {len(latencies)} requests, 0 errors, "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms; {'; '.join(batches)}")
