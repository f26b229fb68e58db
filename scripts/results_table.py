#!/usr/bin/env python
"""Markdown table of several `scripts/evaluate.py` results files, one row per model, one column per protocol.

python scripts/results_table.py "SimMIM=runs/demo/eval.json" "random init=runs/demo/eval_random.json" ...
"""

from __future__ import annotations

import argparse
import json

PROTOCOLS = ("knn", "linear", "finetune")


def table(entries: list[tuple[str, dict]], metric: str = "accuracy") -> str:
    header = "| model | " + " | ".join(f"{p} {metric}" for p in PROTOCOLS) + " |"
    lines = [header, "|---" * (len(PROTOCOLS) + 1) + "|"]
    for name, payload in entries:
        values = {r["protocol"]: r["value"] for r in payload["results"] if r["metric"] == metric}
        cells = [f"{100 * values[p]:.1f}" if p in values else "-" for p in PROTOCOLS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entries", nargs="+", help="NAME=PATH to an evaluate.py results JSON")
    parser.add_argument("--metric", default="accuracy", help="accuracy or top5_accuracy")
    args = parser.parse_args()
    entries = []
    for entry in args.entries:
        name, _, path = entry.partition("=")
        with open(path) as handle:
            entries.append((name, json.load(handle)))
    print(table(entries, args.metric))


if __name__ == "__main__":
    main()
