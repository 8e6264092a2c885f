#!/usr/bin/env python3
"""Makes the model versions the update tests switch between.

    make_update_models.py OUT_DIR

Every version is model "demo": input "x" [N, 4] FP32, output "y" [N, 1].
For each, OUT_DIR/<version>.onnx and OUT_DIR/<version>.model.toml, whose
test vector is onnxruntime's output for x = [0, 1, 2, 3]:

- 1.0.0: y = sum(x)
- 2.0.0: y = 2 sum(x)
- 3.0.0: as 2.0.0, but its test vector expects 7 (it fails)
- 4.0.0: 2 sum(x) through a Gather indexed by x, so any x outside [0, 4)
  fails at run time: it passes its test vector and errors on live data
- 5.0.0: 2 sum(x) plus 0 x a chain of 512 x 512 matrix products of x: the
  same outputs, many times the compute time
"""

import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def model(nodes, inits):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])
    g = helper.make_graph(nodes, "demo", [x], [y], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def w(name, a):
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def linear(k):
    return model([helper.make_node("MatMul", ["x", "w"], ["y"])], [w("w", np.full((4, 1), k))])


def gather():
    nodes = [
        helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "i"], ["g"], axis=0),
        helper.make_node("Add", ["x", "g"], ["xg"]),
        helper.make_node("MatMul", ["xg", "w"], ["y"]),
    ]
    return model(nodes, [w("table", np.zeros(4)), w("w", np.full((4, 1), 2.0))])


def slow():
    rng = np.random.default_rng(5)
    inits = [w("w", np.full((4, 1), 2.0)), w("a", rng.standard_normal((4, 512)) / 2)]
    nodes = [helper.make_node("MatMul", ["x", "a"], ["h0"])]
    for i in range(12):
        inits.append(w(f"b{i}", rng.standard_normal((512, 512)) / np.sqrt(512)))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"b{i}"], [f"h{i + 1}"]))
    inits.append(w("zero", np.zeros((512, 1))))
    nodes += [
        helper.make_node("MatMul", ["h12", "zero"], ["z"]),
        helper.make_node("MatMul", ["x", "w"], ["lin"]),
        helper.make_node("Add", ["lin", "z"], ["y"]),
    ]
    return model(nodes, inits)


def toml(version, x, y):
    fmt = lambda a: ", ".join(repr(float(v)) for v in np.asarray(a).ravel())
    return f"""name = "demo"
version = "{version}"

[test]
tolerance = 1e-4
[[test.input]]
name = "x"
datatype = "FP32"
shape = [1, 4]
data = [{fmt(x)}]
[[test.output]]
name = "y"
datatype = "FP32"
shape = [1, 1]
data = [{fmt(y)}]
"""


def main():
    out = sys.argv[1]
    x = np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    for version, m, bad in [
        ("1.0.0", linear(1.0), False),
        ("2.0.0", linear(2.0), False),
        ("3.0.0", linear(2.0), True),
        ("4.0.0", gather(), False),
        ("5.0.0", slow(), False),
    ]:
        data = m.SerializeToString()
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, {"x": x})
        if bad:
            y = np.array([[7.0]])
        with open(f"{out}/{version}.onnx", "wb") as f:
            f.write(data)
        with open(f"{out}/{version}.model.toml", "w") as f:
            f.write(toml(version, x, y))


main()
