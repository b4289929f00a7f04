"""Transformers: the zoo's Hugging Face / timm exports and the Fashion-MNIST ViT, pruned by the CLI.

    python benchmarks/transformers.py --out benchmarks/results/transformers.md

For each zoo transformer (filled with seeded random weights by the zoo's fill.py, once, into
--filled): valid or not, parameters kept at `l1 --ratio 0.5`, the kept share of attention heads,
FFN neurons and hidden size (groups classified from their members: a MatMul between
activations marks heads, a LayerNorm / RMSNorm or an embedding table the hidden size, the
rest FFN), and the groups that still freeze with their first reason. For the Fashion-MNIST
ViT of ../shared/models, test accuracy (10,000 images) after l1 and after ldrf calibrated on
the first 2,000 training images.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any


from lib.data import load_split, write_calibration, zoo_model
from lib.measure import failure, prune_cli_keep
from lib.paths import RESULTS, SHARED_MODELS, ZOO
from lib.results import write_text
from lib.runtime import accuracy as top1
ZOO_MODELS = (
    "hf_bert", "hf_distilbert", "hf_gpt2", "hf_llama_gqa", "hf_vit",
    "hfdyn_bert", "hfdyn_distilbert", "hfdyn_gpt2", "hfdyn_llama_gqa", "hfdyn_vit", "timm_deit_tiny_patch16_224",
)


def part_of(group: dict[str, Any]) -> str:
    roles = {m.rsplit(":", 1)[-1] for m in group["members"]}
    names = [m.rsplit(":", 1)[0] for m in group["members"]]
    if "heads" in roles:
        return "heads"
    if "norm" in roles or any("Gather" in n and m.endswith(":out") for n, m in zip(names, group["members"])):
        return "hidden"
    return "ffn"


def shares(groups: list[dict[str, Any]]) -> dict[str, str]:
    out = {}
    for part in ("heads", "ffn", "hidden"):
        chosen = [g for g in groups if part_of(g) == part and g["prunable"]]
        size = sum(g["size"] for g in chosen)
        out[part] = f"{sum(g['kept'] for g in chosen)}/{size}" if size else "-"
    return out


def frozen_summary(groups: list[dict[str, Any]]) -> str:
    reasons = Counter((g["frozen_reasons"] or ["?"])[0].split(": ", 1)[-1] for g in groups if not g["prunable"])
    return "; ".join(f"{n}x {r}" for r, n in reasons.most_common())


def fill(model: str, filled: Path) -> Path:
    return zoo_model(model, ZOO, filled)


def zoo_rows(filled: Path, timeout: int) -> list[str]:
    lines = ["| model | valid | params kept | heads kept | FFN kept | hidden kept | groups | frozen (why) |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name in ZOO_MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            run, data, out = prune_cli_keep(fill(name, filled), ["--method", "l1", "--ratio", "0.5"], Path(tmp), timeout)
        if data is None or out is None:
            lines.append(f"| {name} | no: {failure(run)} | | | | | | |")
            continue
        kept = data["after"]["params"] / data["before"]["params"]
        s = shares(data["groups"])
        frozen = sum(1 for g in data["groups"] if not g["prunable"])
        lines.append(f"| {name} | {'yes' if data['validated'] else 'no'} | {kept:.1%} | {s['heads']} | {s['ffn']} | "
                     f"{s['hidden']} | {len(data['groups'])} | {frozen}: {frozen_summary(data['groups'])} |")
    return lines


def accuracy(model: Path) -> float:
    """Test top-1 on the 10,000 test images."""
    return top1(model, *load_split("test"))


def vit_rows(timeout: int) -> list[str]:
    model = SHARED_MODELS / "fmnist_vit.onnx"
    calib = write_calibration(Path(tempfile.gettempdir()) / "fmnist_train2000.npz", 2000)
    lines = ["| Fashion-MNIST ViT | groups pruned | params kept | MACs kept | heads kept | FFN kept | hidden kept | test top-1 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| original | | 100% | 100% | | | | {accuracy(model):.2%} |"]
    for method, extra in (("l1", []), ("ldrf", ["--calib", str(calib)])):
        with tempfile.TemporaryDirectory() as tmp:
            run, data, out = prune_cli_keep(model, ["--method", method, "--ratio", "0.5", *extra], Path(tmp), timeout)
            if data is None or out is None:
                lines.append(f"| {method} 0.5 | error: {failure(run)} | | | | | | |")
                continue
            s = shares(data["groups"])
            pruned = sum(1 for g in data["groups"] if g["kept"] < g["size"])
            lines.append(
                f"| {method} 0.5 | {pruned}/{len(data['groups'])} | {data['after']['params'] / data['before']['params']:.1%} | "
                f"{data['after']['macs'] / data['before']['macs']:.1%} | {s['heads']} | {s['ffn']} | {s['hidden']} | "
                f"{accuracy(out):.2%} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filled", type=Path, default=Path(tempfile.gettempdir()) / "tfzoo")
    ap.add_argument("--out", type=Path, default=RESULTS / "transformers.md")
    ap.add_argument("--timeout", type=int, default=900)
    a = ap.parse_args()
    text = "\n".join([*zoo_rows(a.filled, a.timeout), "", *vit_rows(a.timeout), ""])
    write_text(a.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
