"""Copy the benchmark results into the README between their markers.

    python benchmarks/update_readme.py              # every section
    python benchmarks/update_readme.py tool         # only the named sections

Each section `<!-- NAME -->` ... `<!-- /NAME -->` of README.md is replaced by the text of
benchmarks/results/NAME.md (its first heading dropped), so the README's figures are
always the ones the benchmarks produced.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Section:
    intro: str = ""
    pictures: tuple[str, ...] = ()  # glob patterns under benchmarks/results, shown after the intro
    start_at: str = ""  # copy from this heading on (the rest stays in the linked file)


SECTIONS = {
    "zoo_coverage": Section(
        "Every model of `../shared/zoo` (41 torchvision/timm architectures with seeded random weights from "
        "`fill.py`) pruned with `l1 --ratio 0.5` and validated as above, by `python benchmarks/zoo_coverage.py`. "
        "Frozen = groups with no prunable channel (the classifier output is always one). Random weights: these "
        "figures test structure, not accuracy. The last two columns are the tool's own cost: wall time and "
        "peak memory of the whole command line (load, trace, apply, validate, write)."
    ),
    "real_models": Section(),
    "latency": Section(
        "By `python benchmarks/bench_latency.py`: onnxruntime CPU latency of each zoo model before and after "
        "`l1 --ratio 0.5`, measured in the same process with interleaved runs.",
        ("latency.png",),
    ),
    "tool": Section(),
    "calibration": Section(),
    "accuracy": Section(pictures=("accuracy_*.png",)),
    "anchors": Section(pictures=("anchors.png",)),
    "nm_ranking": Section(),
    "merge": Section(),
    "peers": Section(
        "Full tables: [benchmarks/results/peers.md](benchmarks/results/peers.md), by `python benchmarks/peers.py`.",
        ("peers.png",),
        "## Where a peer is better",
    ),
    "peers_zoo": Section(),
    "budget_blocks": Section(),
}


def body(name: str) -> str:
    section = SECTIONS[name]
    text = (RESULTS / f"{name}.md").read_text().strip()
    if section.start_at and section.start_at in text:
        text = text[text.index(section.start_at):]
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    text = "\n".join(lines).strip()
    text = re.sub(r"^## ", "#### ", text, flags=re.M)
    pictures = [p for pattern in section.pictures for p in sorted(RESULTS.glob(pattern))]
    images = "\n".join(f"![{p.stem}](benchmarks/results/{p.name})" for p in pictures)
    return "\n\n".join(part for part in (section.intro, images, text) if part)


def main(argv: list[str]) -> int:
    unknown = sorted(set(argv) - set(SECTIONS))
    if unknown:
        print(f"unknown sections: {', '.join(unknown)} (known: {', '.join(SECTIONS)})", file=sys.stderr)
        return 2
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name in argv or list(SECTIONS):
        pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S)
        if not (RESULTS / f"{name}.md").exists() or not pattern.search(text):
            print(f"skipped {name}")
            continue
        text = pattern.sub(lambda _m, n=name: f"<!-- {n} -->\n{body(n)}\n<!-- /{n} -->", text)
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
