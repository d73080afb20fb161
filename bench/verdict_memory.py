"""The validate step's verdict alone, at scale: N staged Clinical Activities (the scale
scenario's shape: N/20 Persons taken in turn, each with one CRM Account, N/1000+1 Studies with 2 Sites each;
a share of them defective) through the engine's one GX verdict per suite, as runner.validate
judges them (quality.CheckedRows: every chunk's check frame kept compact, validated at once,
then the rows read again). No vaults, no Airflow.

    PYTHONPATH=include .venv/bin/python bench/verdict_memory.py [--n 1000000] [--defects 0.01]

Prints the time of each pass, the compact check frame's size and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "include"))


def rss_mib() -> float:
    """Peak RSS of the process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def activities(start: int, rows: int, n: int, defects: float, rng: np.random.Generator) -> pd.DataFrame:
    index = np.arange(start, start + rows)
    person = index % max(1, n // 20)  # as seed_scale: each chunk of 20,000 rows names 20,000 Persons
    study = index % (n // 1000 + 1)
    text = lambda prefix, values: pd.Series(np.char.add(prefix, values.astype(str)), dtype=object)  # noqa: E731
    frame = pd.DataFrame({
        "id": text("V1I", index), "global_id__sys": text("1001_V1I", index),
        "modified_date__v": "2026-11-25T11:30:00.000Z", "person__v": text("P", person),
        "person__vr.veeva_network_id__c": text("N", person), "person__vr.id": text("P", person),
        "activity_date__v": "2026-11-25", "channel__v": rng.choice(["phone__v", "email__v", "in_person__v"], rows),
        "complete__v": "true", "subject__v": text("Activity ", index),
        "study__vr.global_id__sys": text("1001_S", study), "site__vr.global_id__sys": text("1001_T", study * 2),
    })
    broken = rng.random(rows) < defects
    frame.loc[broken, "channel__v"] = "fax__c"  # not in the channel map
    frame.loc[broken & (rng.random(rows) < 0.5), "person__vr.veeva_network_id__c"] = "N_unknown"
    return frame


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--defects", type=float, default=0.01, help="share of defective activities (default 0.01)")
    parser.add_argument("--json", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="verdict_memory_"))
    import os

    os.environ.setdefault("CLINICAL_CRM_REPORTS_DIR", str(work / "reports"))
    os.environ.setdefault("CLINICAL_CRM_STAGING_URL", f"file://{work / 'staging'}")
    from clinical_crm.config import load_connection
    from clinical_crm.engine import quality, staging
    from clinical_crm.flows import ctms_to_crm

    cfg = load_connection(REPO / "include" / "connections" / "demo.yaml")
    quality.import_gx()
    rng = np.random.default_rng(1)
    path = f"{staging.run_dir('bench', 'ctms_to_crm', 'verdict')}/activities.parquet"
    chunk = staging.CHUNK_ROWS
    staged = staging.write_frames(path, (activities(s, min(chunk, args.n - s), args.n, args.defects, rng)
                                         for s in range(0, args.n, chunk)))
    persons = np.arange(args.n // 20 + 1)
    reference = {"accounts": pd.DataFrame({"id": [f"A{p}" for p in persons], "veeva_network_id__v": [f"N{p}" for p in persons]}),
                 "studies": {f"1001_S{s}" for s in range(args.n // 1000 + 1)},
                 "sites": {f"1001_T{2 * s}" for s in range(args.n // 1000 + 1)}}
    gc.collect()
    figures = {"n": args.n, "defects": args.defects, "peak_rss_staging_mib": round(rss_mib(), 1),
               "rss_before_mib": round(current_mib(), 1)}

    checked = quality.CheckedRows(staged.path, "account_id")
    validator = quality.Validator("bench", "verdict")
    verdict_at = {}
    real_verdict = validator.verdict

    def timed_verdict(object_name, checks, rules):  # the check frames' size and time, then GX
        verdict_at["checks_mib"] = round(checks.memory_usage(deep=True).sum() / 2**20, 1)
        verdict_at["rss_checks_mib"] = round(current_mib(), 1)
        verdict_at["start"] = time.perf_counter()
        verdict = real_verdict(object_name, checks, rules)
        verdict_at["peak_verdict_mib"] = round(rss_mib(), 1)
        return verdict

    validator.verdict = timed_verdict
    t0 = time.perf_counter()
    verdict = checked.judge(validator, cfg.ctms.activity.object, ctms_to_crm.quality_rules(cfg),
                            lambda c: ctms_to_crm.activity_checks(c, reference, cfg))
    t1 = time.perf_counter()
    good = staging.FrameWriter(str(work / "valid.parquet"))
    failing = 0
    for rows, bad in checked.chunks(verdict):
        failing += int(bad.sum())
        good.write(rows[~bad])
    valid = good.close()
    t2 = time.perf_counter()
    figures.update({"check_frames_s": round(verdict_at["start"] - t0, 2), "verdict_s": round(t1 - verdict_at["start"], 2),
                    "second_pass_s": round(t2 - t1, 2), "check_frame_mib": verdict_at["checks_mib"],
                    "rss_with_check_frame_mib": verdict_at["rss_checks_mib"],
                    "peak_after_verdict_mib": verdict_at["peak_verdict_mib"],
                    "rss_end_mib": round(current_mib(), 1), "peak_rss_mib": round(rss_mib(), 1),
                    "failing": failing, "valid": valid.rows, "per_rule": verdict.per_rule, "suites": verdict.suites})
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
