"""Sandbox throughput: time to seed N Clinical Activities, VQL paging rate, upsert rate.

    .venv/bin/python bench/sandbox_throughput.py [--n 100000]

Seeds a fresh CTMS database (scale scenario), starts the real server in a subprocess, pages
through every activity with one VQL query (1,000 per page, following next_page), then upserts
N new activities in 500-record calls. Figures are printed; nothing else is kept.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import requests

from vault_sandbox.db import Store
from vault_sandbox.models import load_model
from vault_sandbox.seed import DEMO_PASSWORD, INTEGRATION_USER, seed_scale
from vault_sandbox.testing import SandboxServer

API = "v25.2"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="activities to seed, page and upsert")
    args = parser.parse_args()
    n = args.n
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "ctms.db"
        started = time.perf_counter()
        seed_scale(Store(load_model("ctms"), str(db)), n, seed_number=1, now=NOW)
        seed_seconds = time.perf_counter() - started

        with SandboxServer("ctms", db, seed="none") as server:
            http = requests.Session()
            session = http.post(f"{server.url}/api/{API}/auth",
                                data={"username": INTEGRATION_USER, "password": DEMO_PASSWORD}).json()["sessionId"]
            http.headers["Authorization"] = session

            started = time.perf_counter()
            body = http.post(f"{server.url}/api/{API}/query", data={
                "q": "SELECT id, person__v, person__vr.veeva_network_id__c, channel__v, complete__v, "
                     "modified_date__v FROM crm_activity__v ORDER BY modified_date__v"}).json()
            rows, pages = len(body["data"]), 1
            person_ids = [r["person__v"] for r in body["data"]]
            while "next_page" in body["responseDetails"]:
                body = http.get(server.url + body["responseDetails"]["next_page"]).json()
                rows += len(body["data"])
                pages += 1
            query_seconds = time.perf_counter() - started
            assert rows == n, (rows, n)

            started = time.perf_counter()
            written = 0
            for start in range(0, n, 500):
                batch = [{"external_id__v": f"BENCH-{i}", "person__v": person_ids[i % len(person_ids)],
                          "object_type__vr.api_name__v": "clinical_activity__v", "channel__v": "phone__v",
                          "complete__v": True, "subject__v": "Benchmark upsert", "activity_date__v": "2026-11-25"}
                         for i in range(start, min(start + 500, n))]
                result = http.post(f"{server.url}/api/{API}/vobjects/crm_activity__v",
                                   params={"idParam": "external_id__v"}, json=batch).json()
                written += sum(r["responseStatus"] == "SUCCESS" for r in result["data"])
            upsert_seconds = time.perf_counter() - started
            assert written == n, (written, n)
            calls = server.admin.counters()

    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; cpus: {os.cpu_count()}; "
          f"python {platform.python_version()}")
    print(f"seed {n} activities (scale scenario): {seed_seconds:.1f} s ({n / seed_seconds:,.0f} records/s)")
    print(f"VQL paging: {rows} records in {pages} pages, {query_seconds:.1f} s = {rows / query_seconds:,.0f} records/s")
    print(f"upsert: {written} records in {-(-n // 500)} calls of 500, {upsert_seconds:.1f} s = "
          f"{written / upsert_seconds:,.0f} records/s")
    print(f"server counters: {calls['endpoints']}, auth {calls['auth']}, paging {calls['paging']}")


if __name__ == "__main__":
    main()
