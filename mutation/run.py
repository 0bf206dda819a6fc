"""Run every cosmic-ray configuration in mutation/ and print the mutation score per module.

    .venv/bin/python mutation/run.py                   # every mutation/*.toml, every mutant
    .venv/bin/python mutation/run.py --sample 80       # a fixed random sample of 80 mutants per module
    .venv/bin/python mutation/run.py zero_tprune hiprune
    .venv/bin/python mutation/run.py --recheck hiprune   # re-run only the last session's survivors
    .venv/bin/python mutation/run.py --lines 114-135 tome_step   # only the mutants of those lines (a change)
    .venv/bin/python mutation/run.py --lines 127-133,166-168 kernel_guards   # several ranges, one session

cosmic-ray mutates the file on disk, so the runs happen in a scratch copy of the working tree (tracked
and untracked files, not ignored ones), never in the checkout itself: an interrupted run leaves nothing
mutated behind, and the checkout stays usable meanwhile. The copy imports as ``tokenprune`` through
PYTHONPATH; ``tokenprune.patches`` and ``tokenprune.eval`` (``package_dir`` in setup.cfg) are linked
into it, so a mutant of ``patches/timm_vit.py`` is what the tests import.

Each configuration names one module and a test command scoped to the tests that exercise it (seconds
per mutant). Operators that only produce mutants which cannot run on tensors (bitwise and shift
operators in place of arithmetic, ...) are filtered out per configuration (``operators-filter``).
Sessions and the surviving mutants' diffs go to .mutation/ (ignored by git).
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".mutation"
BIN = Path(sys.executable).parent


def scratch_copy() -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    dest = Path(tempfile.mkdtemp(prefix="tokenprune-mutation-"))
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "tokenprune" / "patches").symlink_to("../patches")
    (dest / "tokenprune" / "eval").symlink_to("../eval")
    return dest


def run(cmd: list[str], cwd: Path, env: dict) -> None:
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)


def sample(session: Path, keep: int, seed: int = 0) -> None:
    """Mark all but a fixed random ``keep`` of the pending mutants as skipped."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(session), WorkDB.Mode.open) as db:
        pending = sorted(item.job_id for item in db.pending_work_items)
        if len(pending) <= keep:
            return
        chosen = set(random.Random(seed).sample(pending, keep))
        db.set_multiple_results([j for j in pending if j not in chosen],
                                WorkResult(worker_outcome=WorkerOutcome.SKIPPED))


def line_ranges(text: str) -> list[tuple[int, int]]:
    """``FIRST-LAST[,FIRST-LAST...]`` as ``[(first, last), ...]``."""
    ranges = [tuple(map(int, part.split("-"))) for part in text.split(",")]
    if any(len(r) != 2 or r[0] > r[1] for r in ranges):
        raise SystemExit(f"--lines: expected FIRST-LAST[,FIRST-LAST...], got {text!r}")
    return ranges


def only_lines(session: Path, ranges: list[tuple[int, int]]) -> None:
    """Mark every pending mutant outside the line ``ranges`` (of whichever module it mutates) as skipped."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(session), WorkDB.Mode.open) as db:
        outside = [item.job_id for item in db.pending_work_items
                   if not any(first <= item.mutations[0].start_pos[0] <= last for first, last in ranges)]
        db.set_multiple_results(outside, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))


def forget_survivors(session: Path) -> None:
    """Make the survivors of a finished session pending again (to re-run them against new tests)."""
    import sqlite3

    with sqlite3.connect(session) as db:
        db.execute("DELETE FROM work_results WHERE test_outcome IN ('SURVIVED', 'survived')")


def summarize(name: str, session: Path) -> tuple[int, int, int]:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    killed = survived = incompetent = 0
    diffs = []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            if result.test_outcome == TestOutcome.SURVIVED:
                survived += 1
                m = item.mutations[0]
                diffs.append(f"--- {m.module_path}:{m.start_pos[0]} {m.operator_name} #{m.occurrence}\n{result.diff}")
            elif result.test_outcome == TestOutcome.INCOMPETENT:
                incompetent += 1
            else:
                killed += 1
    (OUT / f"{name}.survivors.txt").write_text("\n".join(diffs))
    return killed, incompetent, survived


def report(name: str, session: Path) -> tuple:
    killed, incompetent, survived = summarize(name, session)
    total = killed + incompetent + survived
    score = (killed + incompetent) / total if total else 1.0
    print(f"{name:<16} mutants {total:4d}  killed {killed:4d}  incompetent {incompetent:3d}  "
          f"survived {survived:3d}  score {score:6.1%}   (survivors: .mutation/{name}.survivors.txt)", flush=True)
    return name, total, killed, incompetent, survived, score


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help="config names (mutation/NAME.toml); default: all")
    parser.add_argument("--sample", type=int, default=0, help="mutants per module (0: all)")
    parser.add_argument("--recheck", action="store_true", help="re-run the survivors of the last session only")
    parser.add_argument("--lines", help="FIRST-LAST[,FIRST-LAST...]: only the mutants of these lines of the module")
    args = parser.parse_args()
    configs = [ROOT / "mutation" / f"{n}.toml" for n in args.configs] or sorted((ROOT / "mutation").glob("*.toml"))
    OUT.mkdir(exist_ok=True)
    copy = scratch_copy()
    # the copy's CPU build in a cache of its own: torch keys a cached build by name and rebuilds it whenever the
    # sources' path changes, so the copy and the checkout (used meanwhile) rebuilt each other's, 50 s a mutant
    env = {**os.environ, "PYTHONPATH": str(copy), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "TORCH_EXTENSIONS_DIR": str(copy / ".torch_extensions")}
    rows = []
    try:
        for config in configs:
            name = config.stem
            session = OUT / f"{name}.sqlite"
            if args.recheck:
                forget_survivors(session)
                run([str(BIN / "cosmic-ray"), "exec", str(config), str(session)], copy, env)
                rows.append(report(name, session))
                continue
            session.unlink(missing_ok=True)
            command = re.search(r'^test-command = "(.*)"$', config.read_text(), re.M).group(1)
            if subprocess.run(shlex.split(command), cwd=copy, env=env, capture_output=True).returncode:
                print(f"{name:<16} its tests fail without any mutant: {command}", flush=True)
                rows.append((name, 0, 0, 0, 0, 0.0))
                continue
            run([str(BIN / "cosmic-ray"), "init", str(config), str(session)], copy, env)
            if "operators-filter" in config.read_text():
                run([str(BIN / "cr-filter-operators"), str(session), str(config)], copy, env)
            if args.lines:
                only_lines(session, line_ranges(args.lines))
            if args.sample:
                sample(session, args.sample)
            run([str(BIN / "cosmic-ray"), "exec", str(config), str(session)], copy, env)
            rows.append(report(name, session))
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return 0 if all(row[-1] >= 0.9 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
