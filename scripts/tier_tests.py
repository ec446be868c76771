"""Write tests/slow_tests.txt, the fast tier's cut, from a pytest run's durations: every test whose setup,
call and teardown took at least THRESHOLD seconds on a 2-core machine (the CI's) goes to the full tier only
(conftest.py marks the listed tests `slow`). Re-run when the fast tier (`-m "not slow"`) passes 3 minutes:

    python -m pytest -q -n 2 -m "not slow" --durations=0 -p no:cacheprovider > /tmp/durations.log
    python scripts/tier_tests.py /tmp/durations.log          # adds to the list; never drops an entry

usage: python scripts/tier_tests.py DURATIONS_LOG [THRESHOLD]
"""
from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

LIST = Path(__file__).resolve().parent.parent / "tests" / "slow_tests.txt"
HEADER = ("# Tests of the full tier only (conftest.py marks them slow): each took >= {t} s on 2 cores.\n"
          "# Written by scripts/tier_tests.py from a --durations=0 log; one pytest node id a line.\n")


def main() -> None:
    log, threshold = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    seconds = collections.Counter()
    for line in Path(log).read_text().splitlines():
        m = re.match(r"\s*([\d.]+)s (?:call|setup|teardown)\s+(\S+)", line)
        if m:
            seconds[m.group(2)] += float(m.group(1))
    old = {l for l in LIST.read_text().splitlines() if l and not l.startswith("#")} if LIST.exists() else set()
    slow = old | {node for node, t in seconds.items() if t >= threshold}
    LIST.write_text(HEADER.format(t=threshold) + "".join(f"{n}\n" for n in sorted(slow)))
    added = slow - old
    print(f"{len(slow)} slow tests ({len(added)} new): {sum(seconds[n] for n in added):.0f} s out of the fast tier's "
          f"{sum(seconds.values()):.0f} s")


if __name__ == "__main__":
    main()
