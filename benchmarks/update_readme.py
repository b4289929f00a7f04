"""Copy the benchmark results into the README between their markers.

    python benchmarks/update_readme.py

Each section `<!-- NAME -->` ... `<!-- /NAME -->` of README.md is replaced by the text of
benchmarks/results/NAME.md (its first heading dropped), so the README's figures are
always the ones the benchmarks produced.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "zoo_coverage": "Every model of `../shared/zoo` (41 torchvision/timm architectures with seeded random weights from "
    "`fill.py`) pruned with `l1 --ratio 0.5` and validated as above, by `python benchmarks/zoo_coverage.py`. "
    "Frozen = groups with no prunable channel (the classifier output is always one). Random weights: these "
    "figures test structure, not accuracy.",
    "latency": "By `python benchmarks/bench_latency.py`: onnxruntime CPU latency of each zoo model before and after "
    "`l1 --ratio 0.5`, measured in the same process with interleaved runs.",
    "accuracy": "",
    "budget_blocks": "",
}


def body(name: str) -> str:
    text = (ROOT / "benchmarks" / "results" / f"{name}.md").read_text().strip()
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    text = "\n".join(lines).strip()
    text = re.sub(r"^## ", "#### ", text, flags=re.M)
    intro = SECTIONS[name]
    return f"{intro}\n\n{text}" if intro else text


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name in SECTIONS:
        pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S)
        if not (ROOT / "benchmarks" / "results" / f"{name}.md").exists() or not pattern.search(text):
            print(f"skipped {name}")
            continue
        text = pattern.sub(lambda _m, n=name: f"<!-- {n} -->\n{body(n)}\n<!-- /{n} -->", text)
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
