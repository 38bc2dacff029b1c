"""Writes examples/byo-tool/model.onnx: a tiny, untrained "bright spot" detector.

It exists to show the package format (docs/byo-tool-package.md), not to find anything:
the 128 x 128 input (normalised with mean 0.5, std 0.25 by the package's own preprocess)
is averaged over 8 x 8 cells -> ``cam`` [batch, 1, 16, 16] heatmap logits; ``score``
[batch, 1] is the heatmap's maximum. A region brighter than the window's middle gives a
positive logit. Built with onnx.helper (no torch), opset 13, deterministic; about 1 KB.

    .venv/bin/python examples/byo-tool/make_model.py   # needs the 'onnx' package
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE = 128
CELL = 8


def build(size: int = SIZE, cell: int = CELL) -> onnx.ModelProto:
    gain = numpy_helper.from_array(np.array([4.0], np.float32), "gain")
    bias = numpy_helper.from_array(np.array([-1.0], np.float32), "bias")
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[cell, cell], strides=[cell, cell]),
        helper.make_node("Mul", ["pooled", "gain"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["cam"]),
        helper.make_node("ReduceMax", ["cam"], ["peak"], axes=[2, 3], keepdims=0),  # [batch, 1]
        helper.make_node("Identity", ["peak"], ["score"]),
    ]
    side = size // cell
    graph = helper.make_graph(
        nodes, "bright_spot_demo",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["batch", 1, side, side])],
        initializer=[gain, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="mosmedai-example")
    model.ir_version = 8  # readable by every ONNX Runtime the platform supports
    onnx.checker.check_model(model)
    return model


def main() -> int:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "model.onnx"
    onnx.save(build(), str(target))
    print(f"wrote {target} ({target.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
