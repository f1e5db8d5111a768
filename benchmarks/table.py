"""Print every benchmark result in benchmarks/results/*.json as one table.

    python -m benchmarks.table

Each benchmark script measures ift and its baselines in the same run and writes
`benchmarks/results/<name>.json` as {"benchmark", "date", "machine", "measurements": {...},
"baselines": {...}, "ratios": {...}}; this prints the ratios with their inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    files = sorted(RESULTS.glob("*.json"))
    if not files:
        print("no benchmark results yet (benchmarks/results/*.json)")
        return 0
    rows = [("benchmark", "key", "value")]
    for f in files:
        data = json.loads(f.read_text())
        for section in ("measurements", "baselines", "ratios"):
            for k, v in data.get(section, {}).items():
                value = f"{v:.4g}" if isinstance(v, int | float) else str(v)
                rows.append((f.stem, f"{section}.{k}", value))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
