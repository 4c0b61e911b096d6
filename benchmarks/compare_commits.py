"""Per-layer CPU times of two commits, side by side: is a change free of regressions?

    python -m benchmarks.compare_commits [--base REV] [--head REV] [--rounds 3] [--quick]

Checks both commits out (``git worktree``, in a temporary folder), then runs each one's own
``benchmarks/layers.py`` suite (filtered forward and backward, r = 2 and 4, batch 8) in
alternating processes, ``--rounds`` times each, so that the machine's drift weighs on both
alike. Prints, per layer and ``r``, the median filtered forward and backward time of each
commit and their ratio (head / base), and the geometric means; with ``--out`` writes them
as JSON. ``--base`` defaults to the last commit before the package took layers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAST_FLAT_COMMIT = "16393e3"  # the last commit of the flat package (before "Layout: ...")

# Run inside a worktree: that commit's own benchmark code on that commit's own package.
_CHILD = """
import json, sys, torch
from benchmarks import layers
torch.set_num_threads({threads})
specs = layers.PAPER_SUITE + layers.OTHER
if {quick}:
    specs = specs[3:5] + layers.OTHER[:1]
rows = []
for r in (2, 4):
    for spec in specs:
        small = spec.size[0] * spec.size[1] < layers.SMALL_MAP_CELLS
        repeats = {repeats} * (layers.SMALL_MAP_FACTOR if small else 1)
        row = layers.bench_layer(spec, r, 8, repeats, "cpu", torch.float32)
        rows.append({{k: row[k] for k in ("name", "r", "fwd_filtered_ms", "bwd_filtered_ms")}})
print("ROWS " + json.dumps(rows))
"""


def _worktree(rev: str, into: Path) -> Path:
    path = into / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    return path


def _run(tree: Path, threads: int, repeats: int, quick: bool) -> list[dict]:
    code = _CHILD.format(threads=threads, repeats=repeats, quick=quick)
    env = {**os.environ, "PYTHONPATH": str(tree)}  # that commit's package before the installed one
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("ROWS "))
    return json.loads(line[5:])


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def compare(base: str, head: str, rounds: int, threads: int, repeats: int, quick: bool) -> dict:
    """The per-layer medians of both commits and their ratios (see the module's docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        trees = {rev: _worktree(rev, Path(tmp)) for rev in (base, head)}
        try:
            runs: dict[str, list[list[dict]]] = {base: [], head: []}
            for i in range(rounds):
                for rev in ((base, head) if i % 2 == 0 else (head, base)):
                    print(f"round {i + 1}/{rounds}: {rev}", file=sys.stderr, flush=True)
                    runs[rev].append(_run(trees[rev], threads, repeats, quick))
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    rows = []
    for j, row in enumerate(runs[base][0]):
        out = {"name": row["name"], "r": row["r"]}
        for key in ("fwd_filtered_ms", "bwd_filtered_ms"):
            b = statistics.median(run[j][key] for run in runs[base])
            h = statistics.median(run[j][key] for run in runs[head])
            out[key] = {"base": b, "head": h, "ratio": h / b}
        rows.append(out)
    summary = {key: {"geomean_ratio": _geomean([row[key]["ratio"] for row in rows]),
                     "max_ratio": max(row[key]["ratio"] for row in rows)}
               for key in ("fwd_filtered_ms", "bwd_filtered_ms")}
    return {"base": base, "head": head, "rounds": rounds, "threads": threads, "rows": rows, "summary": summary}


def table(result: dict) -> str:
    lines = [f"| layer | r | forward {result['base']} -> {result['head']} (ms) | ratio | "
             f"backward {result['base']} -> {result['head']} (ms) | ratio |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        f, b = row["fwd_filtered_ms"], row["bwd_filtered_ms"]
        lines.append(f"| {row['name']} | {row['r']} | {f['base']:.3f} -> {f['head']:.3f} | {f['ratio']:.3f} | "
                     f"{b['base']:.3f} -> {b['head']:.3f} | {b['ratio']:.3f} |")
    s = result["summary"]
    lines.append(f"| geometric mean | | | {s['fwd_filtered_ms']['geomean_ratio']:.3f} | | "
                 f"{s['bwd_filtered_ms']['geomean_ratio']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=LAST_FLAT_COMMIT)
    p.add_argument("--head", default="HEAD")
    p.add_argument("--rounds", type=int, default=3, help="runs of each commit, alternating (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="turns per layer within a run (default 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="three layers only")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    result = compare(args.base, args.head, args.rounds, args.threads, args.repeats, args.quick)
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
