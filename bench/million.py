"""The 1,000,000-activity run (not part of CI: about half an hour on 2 cores).

    .venv/bin/python bench/million.py [--json FILE]

Runs bench/floor.py for N = 100,000 and 1,000,000 in one invocation, so the scaling figure
(time at 1,000,000 against 100,000; target within 11 x) and the peak RSS at 1,000,000 (target
under 1 GiB) come from the same run. Extra options are passed to floor.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import floor  # noqa: E402

if __name__ == "__main__":
    sys.exit(floor.main(["--n", "100000", "--n", "1000000", *sys.argv[1:]]))
