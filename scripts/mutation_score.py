"""Print the mutation score of the last `mutmut run` and fail below the bar.

Reads mutants/mutmut-cicd-stats.json (`mutmut export-cicd-stats`); the bar is
the one docs/testing.md holds the suite to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BAR = 0.85


def main() -> int:
    stats = json.loads(Path("mutants/mutmut-cicd-stats.json").read_text())
    killed, total = stats["killed"], stats["total"]
    score = killed / total if total else 0.0
    print(
        f"mutation score: {killed}/{total} killed ({score:.1%}); {stats['survived']} survived,"
        f" {stats['no_tests']} without a test, {stats['timeout']} timed out"
    )
    if score < BAR:
        print(f"below {BAR:.0%}: see `mutmut results` and docs/testing.md", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
