"""Shared constants and fixtures of the tests (nothing here is autouse; the suite-wide settings are in the root conftest)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import onnx
import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # `import models` from any rootdir / import mode
    sys.path.insert(0, str(TESTS))

import models as M  # noqa: E402

REPO = TESTS.parent
SAMPLE = REPO / "onnxslim_prune" / "sample"
SAMPLE_LENET = SAMPLE / "lenet300.onnx"  # LeNet-300-100 trained on Fashion-MNIST, input "input" [N, 1, 28, 28]
SAMPLE_FMNIST = SAMPLE / "fmnist_test500.npz"  # 500 Fashion-MNIST test images ("input") with their "labels"
SHARED_MODELS = REPO.parent / "shared" / "models"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) -> its sha256; folders map to '<dir>'."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        out[str(p.relative_to(folder))] = "<dir>" if p.is_dir() else sha256(p)
    return out


def check_full(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A statistics cache of this test's own, empty at its start (the suite shares one otherwise): every statistic
    the test needs is computed by it. A module uses it for all its tests with
    ``pytestmark = pytest.mark.usefixtures("private_cache")``."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ONNXSLIM_PRUNE_CACHE", str(cache))
    return cache


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A folder with good and bad model files for the CLI tests.

    good.onnx    conv chain (prunable)
    single.onnx  one Conv whose output is the graph output (nothing prunable)
    text.onnx    a text file
    trunc.onnx   the first half of good.onnx's bytes
    bad.onnx     a node reads an undefined tensor (fails the checker)
    adir/        a folder
    """
    onnx.save(M.conv_chain(), tmp_path / "good.onnx")
    onnx.save(M.single_conv(), tmp_path / "single.onnx")
    (tmp_path / "text.onnx").write_text("this is not an ONNX model\n")
    data = (tmp_path / "good.onnx").read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    bad = M.conv_chain()
    bad.graph.node[1].input[0] = "undefined_tensor"
    onnx.save(bad, tmp_path / "bad.onnx")
    (tmp_path / "adir").mkdir()
    return tmp_path
