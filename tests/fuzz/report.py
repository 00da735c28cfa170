"""Print the fuzz tallies written by the last run (``build/fuzz/*.json``) and their total as JSON lines.

Exit status 1 when any suite counted an untyped, silent, wrong or hung case, or when no tally was found.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

REPORT_DIR = Path(__file__).resolve().parents[2] / "build" / "fuzz"
OUTCOMES = ("ok", "typed", "untyped", "silent", "wrong", "hang")


def main() -> int:
    files = sorted(REPORT_DIR.glob("*.json"))
    total: Counter[str] = Counter()
    for file in files:
        data = json.loads(file.read_text())
        print(json.dumps(data))
        total["cases"] += data["cases"]
        for name in OUTCOMES:
            total[name] += data.get(name, 0)
    print(json.dumps({"suite": "total", **{k: total.get(k, 0) for k in ("cases", *OUTCOMES)}}))
    bad = sum(total[name] for name in ("untyped", "silent", "wrong", "hang"))
    return 1 if bad or not files else 0


if __name__ == "__main__":
    sys.exit(main())
