"""How long a full audit takes from a cold cache: this tree against an earlier revision, side by side.

    python benchmarks/audit_speed.py [--baseline REV] [--data ../shared/data/multiregion]
        [--splits splits/multiregion_seed0.csv] [--rounds 2] [--out benchmarks/results-audit-speed.json]

Each round runs ``fracdet audit DATA --splits SPLITS --json`` once with the baseline's code (a ``git worktree``
of ``REV``) and once with this tree's, in alternating order, each in a fresh process with an empty feature
cache, so both pay for decoding, embedding and the duplicate search; this machine's speed drifts over minutes,
which alternation spreads over both. Records wall time, CPU time (user, system), peak RSS, minor page faults
and context switches of each run (what the system time may go to), the ratio of the medians, and whether the
two reports agree: every key, every count and every file equal, floats within ``--tolerance`` (the embedder's
outputs may move by float rounding). Exits 1 if they do not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _checkout import checkout, revisions
from _child import run_measured

ROOT = Path(__file__).resolve().parents[1]


def run_audit(src: Path, data: str, splits: str, report: Path) -> dict:
    """One cold audit with the package under ``src``: its times, peak RSS and report path."""
    with tempfile.TemporaryDirectory(prefix="fracdet-cache-") as cache:
        env = {**os.environ, "PYTHONPATH": str(src), "FRACDET_CACHE": cache, "FRACDET_PROGRESS": "0"}
        command = [sys.executable, "-m", "fracdet", "audit", data, "--splits", splits, "--json", str(report)]
        done = run_measured(command, env=env, cwd=ROOT, stderr=True)
    if done.exit_code != 0:
        raise SystemExit(f"audit with {src} failed ({done.exit_code})")
    return {"wall_s": round(done.wall_s, 1), "user_s": round(done.user_s, 1), "system_s": round(done.kernel_s, 1),
            "peak_rss_mib": round(done.peak_rss_gib * 1024), "minor_faults": done.minor_faults,
            "context_switches": done.context_switches}  # fmt: skip


def differences(a, b, tolerance: float, path: str = "") -> list[str]:
    """Where two JSON reports differ: keys, lengths, strings, integers exactly; floats beyond ``tolerance``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        return out + [d for k in sorted(set(a) & set(b)) for d in differences(a[k], b[k], tolerance, f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items against {len(b)}"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in differences(x, y, tolerance, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        same = a == b or abs(a - b) <= tolerance or (a != a and b != b)  # equal infinities, or both NaN
        return [] if same else [f"{path}: {a} against {b}"]
    return [] if a == b else [f"{path}: {a!r} against {b!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with (default: the last commit)")
    parser.add_argument("--data", default="../shared/data/multiregion")
    parser.add_argument("--splits", default="splits/multiregion_seed0.csv")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest float difference between reports")
    parser.add_argument("--out", default="benchmarks/results-audit-speed.json")
    args = parser.parse_args()

    revision, tree = revisions(args.baseline)
    runs: dict[str, list[dict]] = {"baseline": [], "this": []}
    with tempfile.TemporaryDirectory(prefix="fracdet-reports-") as scratch, checkout(revision) as baseline_src:
        sources = {"baseline": baseline_src, "this": ROOT / "src"}
        for round_ in range(args.rounds):
            for name in ("baseline", "this") if round_ % 2 == 0 else ("this", "baseline"):
                run = run_audit(sources[name], args.data, args.splits, Path(scratch) / f"{name}.json")
                runs[name].append(run)
                print(f"round {round_ + 1}, {name}: {run}", flush=True)
        reports = {name: json.loads((Path(scratch) / f"{name}.json").read_text()) for name in runs}
    found = differences(reports["baseline"], reports["this"], args.tolerance)
    median = {name: statistics.median(r["wall_s"] for r in rs) for name, rs in runs.items()}
    result = {
        "command": "python benchmarks/audit_speed.py " + " ".join(sys.argv[1:]),
        "data": args.data, "splits": args.splits, "cpus": os.cpu_count(),
        "baseline": revision, "this": tree, "runs": runs,
        "median_wall_s": median, "ratio_this_to_baseline": round(median["this"] / median["baseline"], 3),
        "reports_agree": not found, "differences": found[:20],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_wall_s", "ratio_this_to_baseline", "reports_agree")}))
    if found:
        print("\n".join(found[:20]), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
