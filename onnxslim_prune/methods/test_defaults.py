"""The method of a run without ``--method``: l1 without data, by the model's kind with ``--calib``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner

from ..cli import main
from ..ops.test_attention import _attention_text
from ..ops.testing import parse, weights
from .defaults import ModelKind, default_method, model_kind


def _attention() -> onnx.ModelProto:
    return parse(
        _attention_text(), wq=weights(8, 8), bq=weights(8, seed=1), wk=weights(8, 8, seed=2), wv=weights(8, 8, seed=3),
        wo=weights(8, 8, seed=4), split=np.array([1, 4, 4, 2]), merge=np.array([1, 4, 8]), scale=np.array(0.7),
        mask=weights(1, 1, 1, 4, seed=5),
    )


def _mlp_with_a_softmax_head() -> onnx.ModelProto:
    """A classifier's Softmax reads a MatMul with a constant weight: not attention."""
    return parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,8] x) => (float[1,4] y) {
      h = MatMul (x, w1)
      r = Relu (h)
      z = MatMul (r, w2)
      y = Softmax <axis = -1> (z)
    }""", w1=weights(8, 8), w2=weights(8, 4, seed=1))


def test_attention_is_a_transformer_and_a_softmax_classifier_is_not() -> None:
    assert model_kind(_attention()) is ModelKind.TRANSFORMER
    assert model_kind(_mlp_with_a_softmax_head()) is ModelKind.OTHER
    assert default_method(_attention(), with_data=True).name == "obs"
    assert default_method(_mlp_with_a_softmax_head(), with_data=True).name == "thinet"
    assert default_method(_attention(), with_data=False).name == "l1"


def _run(folder: Path, model: onnx.ModelProto, *extra: str) -> tuple[bytes, str]:
    onnx.save(model, folder / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", x=rng.standard_normal((24, 4, 8)).astype(np.float32))
    out = folder / f"out{len(extra)}.onnx"
    result = CliRunner().invoke(main, [str(folder / "m.onnx"), "-o", str(out), "--calib", str(folder / "calib.npz"),
                                       "--ratio", "0.5", "--round-to", "1", "--no-latency", *extra])
    assert result.exit_code == 0, result.output
    return out.read_bytes(), result.stderr


def test_with_calib_and_no_method_the_transformer_default_runs_and_says_so(tmp_path: Path) -> None:
    chosen, said = _run(tmp_path, _attention())
    named, _ = _run(tmp_path, _attention(), "--method", "obs")
    assert "method: obs (the real-model suite's best with --calib for a transformer" in said
    assert chosen == named  # the same model, byte for byte, as naming the method
    pruned = onnx.load_from_string(chosen)
    kept = {t.name: t.dims for t in pruned.graph.initializer}
    assert list(kept["wq"]) == [8, 4] and list(kept["wo"]) == [4, 8]  # two of four heads removed
