"""Keep a seeded random sample of a cosmic-ray session's pending mutants; mark the rest skipped.

    python mutation/sample.py mutation/core.sqlite 60 [seed]

For a machine too slow or too shared to run every mutant in the time at hand: run
``cosmic-ray init`` and ``cr-filter-operators`` first, then this, then ``cosmic-ray exec``; the
killed fraction of the sample estimates the score (``cr-report`` lists the skipped ones as such).
"""
import random
import sqlite3
import sys


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or not argv[1].isdigit() or (len(argv) == 3 and not argv[2].lstrip("-").isdigit()):
        print("usage: python mutation/sample.py SESSION.sqlite N [SEED]", file=sys.stderr)
        return 2
    db = sqlite3.connect(argv[0])
    pending = [row[0] for row in db.execute(
        "select job_id from work_items where job_id not in (select job_id from work_results) order by job_id")]
    random.seed(int(argv[2]) if len(argv) == 3 else 0)
    keep = set(random.sample(pending, min(int(argv[1]), len(pending))))
    db.executemany("insert into work_results (worker_outcome, output, test_outcome, diff, job_id) "
                   "values ('SKIPPED', 'not in the sample', NULL, NULL, ?)", [(j,) for j in pending if j not in keep])
    db.commit()
    print(f"{len(keep)} of {len(pending)} pending mutants kept")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
