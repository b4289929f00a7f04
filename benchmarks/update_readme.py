"""Regenerate every figure and table of the documentation from the committed results, in one command.

    python benchmarks/update_readme.py

- `docs/benchmarks.md`: every table of `benchmarks/results/NAME.md`, in the chapters below, with its plots and
  the command that made it (a result file that does not exist yet is left out);
- the README's "At a glance" (`<!-- glance -->` markers): headline figures computed from the results' JSON
  by `benchmarks/lib/glance.py`;
- `docs/ops.md`, `docs/methods.md`, `docs/cli.md`: from the op-rule registry, the methods and the click command
  (`benchmarks/update_docs.py`).

Nothing between the markers or in the generated pages is edited by hand; the prose pages of docs/ (usage, ci,
search, quantized, limits) are.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

from lib import glance, require_checkout
from lib.paths import RESULTS, ROOT
from lib.results import write_text

DOCS = ROOT / "docs"


@dataclass(frozen=True)
class Section:
    name: str  # benchmarks/results/NAME.md
    title: str
    script: str  # the benchmark that writes it
    intro: str = ""
    pictures: tuple[str, ...] = ()  # glob patterns under benchmarks/results, shown after the intro


@dataclass(frozen=True)
class Chapter:
    title: str
    sections: tuple[Section, ...]


ZOO = "Seeded random weights (`../shared/zoo/fill.py`): these figures test structure and speed, not accuracy."

CHAPTERS = (
    Chapter("The real-model suite", (
        Section("real_suite", "Trained models on realistic data", "real_suite.py",
                "The yardstick: EfficientNet-Lite1 (ImageNet) on photo-like images, all-MiniLM-L6-v2 and SmolLM2-135M on "
                "English text, every figure measured by the benchmark on an eval split the tool never saw.",
                ("real_suite_*.png",)),
    )),
    Chapter("Coverage", (
        Section("zoo_coverage", "Coverage of the zoo", "zoo_coverage.py"),
        Section("transformers", "Transformers of the zoo", "transformers.py", ZOO),
        Section("quantized_zoo", "Quantized and fp16 zoo", "bench_quantized.py", ZOO),
        Section("peers_zoo", "onnxsim on the zoo", "peers_zoo.py"),
        Section("peers_transformers", "Peers on transformers", "peers_transformers.py"),
        Section("budget_blocks", "Budgets, layer-compensated pruning, block pruning", "bench_budget_blocks.py"),
    )),
    Chapter("Accuracy", (
        Section("accuracy", "Accuracy without fine-tuning", "bench_accuracy.py", pictures=("accuracy_*.png",)),
        Section("search", "The gated search", "bench_search.py", pictures=("search_*.png",)),
        Section("search_speed", "Speed of the gated search", "bench_search_speed.py"),
        Section("transformers_vit", "The Fashion-MNIST ViT", "bench_vit.py", pictures=("transformers_vit*.png",)),
        Section("quantized_fmnist", "Quantized models", "bench_quantized.py"),
        Section("ridge", "Ridge of the refit", "bench_ridge.py"),
        Section("peers", "Peers on Fashion-MNIST", "peers.py", pictures=("peers.png",)),
    )),
    Chapter("Neuron Merging", (
        Section("anchors", "The paper's anchors", "peers.py", pictures=("anchors.png",)),
        Section("nm_ranking", "The authors' ranking", "bench_nm_ranking.py"),
        Section("merge", "Partners and the paper's VGG setting", "bench_merge.py"),
    )),
    Chapter("Does the verdict tell the truth?", (
        Section("verdict", "Does the held-out verdict agree with unseen data", "bench_verdict.py"),
        Section("real_models", "Trained models from PyPI packages", "bench_real_models.py"),
        Section("real_search", "The gated search on the PyPI models", "bench_real_search.py"),
    )),
    Chapter("Speed", (
        Section("latency", "Latency of the pruned zoo", "bench_latency.py", ZOO, ("latency.png",)),
        Section("latency_search", "Latency-targeted search", "bench_latency_search.py", ZOO),
        Section("round_to", "Channel multiples that matter", "bench_round_to.py"),
        Section("never_slower", "Never slower with default flags", "bench_never_slower.py", ZOO),
        Section("tool", "Speed and memory of the tool", "bench_tool.py"),
        Section("calibration", "Cost of calibration statistics", "bench_calibration.py"),
        Section("engine", "The calibration engine", "bench_engine.py"),
        Section("engine_tv_resnet50", "The calibration engine on ResNet-50", "bench_engine.py"),
        Section("real_memory", "Peak memory against --calib-memory", "bench_real_memory.py"),
    )),
    Chapter("Same command, same bytes", (
        Section("identical_zoo", "The zoo against a revision", "check_identical.py"),
        Section("identical_fmnist", "Fashion-MNIST against a revision", "check_identical.py"),
        Section("identical_methods", "Every method against a revision", "check_identical.py"),
        Section("identical_pipeline", "The pass pipeline and the new layout against the revision before", "check_identical.py"),
    )),
)


def body(section: Section) -> str:
    """The result file without its title, its headings two levels down, its plots first."""
    lines = (RESULTS / f"{section.name}.md").read_text().strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    text = re.sub(r"^(#{2,3}) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", "\n".join(lines).strip(), flags=re.M)
    pictures = [p for pattern in section.pictures for p in sorted(RESULTS.glob(pattern))]
    images = "\n".join(f"![{p.stem}](../benchmarks/results/{p.name})" for p in pictures)
    source = (f"Full results: [{section.name}.md](../benchmarks/results/{section.name}.md) (and `.json`), written by "
              f"`python benchmarks/{section.script}`.")
    return "\n\n".join(part for part in (section.intro, source, images, text) if part)


def benchmarks_page() -> str:
    present = [(c, [s for s in c.sections if (RESULTS / f"{s.name}.md").exists()]) for c in CHAPTERS]
    present = [(c, s) for c, s in present if s]
    lines = ["# Benchmarks", "",
             "Generated by `python benchmarks/update_readme.py` from `benchmarks/results/` (which `python "
             "benchmarks/run_all.py` writes); nothing here is edited by hand. Every accuracy figure is on data the tool "
             "never saw: the Fashion-MNIST test split, or photos outside its calibration folder. Timings are from a "
             "2-core machine, as ratios within one run where they compare.", ""]
    for chapter, sections in present:
        lines.append(f"- [{chapter.title}](#{glance.slug(chapter.title)}): "
                     + ", ".join(f"[{s.title}](#{glance.slug(s.title)})" for s in sections))
    for chapter, sections in present:
        lines += ["", f"## {chapter.title}"]
        for section in sections:
            lines += ["", f"### {section.title}", "", body(section)]
    return "\n".join(lines) + "\n"


def replace_marked(text: str, name: str, content: str) -> str:
    pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name} --> markers")
    return pattern.sub(lambda _m: f"<!-- {name} -->\n{content}\n<!-- /{name} -->", text)


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="No arguments: everything is regenerated.").parse_args(argv)
    require_checkout()  # docs/ops.md, methods.md and cli.md describe this checkout's code
    from lib.docs import write_pages

    write_text(DOCS / "benchmarks.md", benchmarks_page())
    readme = ROOT / "README.md"
    write_text(readme, replace_marked(readme.read_text(), "glance", glance.glance()))
    write_pages()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
