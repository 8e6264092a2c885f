#!/usr/bin/env python3
"""Makes the versions of model mlp that scenarios 030 and 031 publish.

    make_versions.py MODELS_DIR OUT_DIR

MODELS_DIR holds mlp.onnx, mlp.model.toml and mlp.ref.json (ci/setup.sh
writes them to .cache/models); the image bakes that model in as 1.0.0. For
each VERSION below this writes OUT_DIR/VERSION.onnx, OUT_DIR/VERSION.model.toml
(mlp.model.toml with its version and, where said, its expected outputs
replaced) and OUT_DIR/VERSION.ref.json (the reference input and onnxruntime's
output for it, for ci/models/interop.py):

- 2.0.0: other weights (1.0.0's, each scaled by a seeded factor in
  [0.5, 1.5]): the same input gives other outputs, checked here to differ
  from 1.0.0's by far more than the tolerance, so a client sees which
  version answered.
- 3.0.0: 2.0.0 with a test vector expecting each output + 1000: it fails.
- 4.0.0: 2.0.0 behind a guard, Gather(table, Cast(features + 4)) added to
  the features, with an 8-entry table of zeros: the same outputs for every
  feature in [-4, 4) (the test vector's are within [-2.9, 3.2], so it
  passes), and an index out of range (a failed request) for any feature
  beyond: it errors on live data that leaves the training range.
"""

import json
import re
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def run(model, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feed)))


def reweighted(base):
    m = onnx.ModelProto()
    m.CopyFrom(base)
    rng = np.random.default_rng(2)
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        scaled = (a * rng.uniform(0.5, 1.5, a.shape)).astype(a.dtype)
        init.CopyFrom(numpy_helper.from_array(scaled, init.name))
    onnx.checker.check_model(m)
    return m


def guarded(base, input_name, table=8):
    m = onnx.ModelProto()
    m.CopyFrom(base)
    g = m.graph
    guarded_name = f"{input_name}_guarded"
    for node in g.node:
        node.input[:] = [guarded_name if i == input_name else i for i in node.input]
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array(table // 2, dtype=np.float32), "guard_shift"),
            numpy_helper.from_array(np.zeros(table, dtype=np.float32), "guard_table"),
        ]
    )
    guard = [
        helper.make_node("Add", [input_name, "guard_shift"], ["guard_shifted"]),
        helper.make_node("Cast", ["guard_shifted"], ["guard_index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["guard_table", "guard_index"], ["guard_zeros"], axis=0),
        helper.make_node("Add", [input_name, "guard_zeros"], [guarded_name]),
    ]
    nodes = guard + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    return m


def tensor_json(datatype, array):
    return {"datatype": datatype, "shape": list(array.shape), "data": [float(v) for v in array.ravel()]}


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    models, out = sys.argv[1], sys.argv[2]
    base = onnx.load(f"{models}/mlp.onnx")
    with open(f"{models}/mlp.model.toml") as f:
        config = f.read()
    with open(f"{models}/mlp.ref.json") as f:
        ref = json.load(f)
    (input_name, t), = ref["inputs"].items()
    feed = {input_name: np.array(t["data"], dtype=np.float32).reshape(t["shape"])}
    (output_name, want1), = ref["outputs"].items()
    v1 = np.array(want1["data"], dtype=np.float32).reshape(want1["shape"])

    v2 = reweighted(base)
    y2 = run(v2, feed)[output_name]
    if np.max(np.abs(y2 - v1)) < 0.05:
        sys.exit(f"make_versions: 2.0.0's outputs {y2.ravel()} are too close to 1.0.0's {v1.ravel()}")
    v4 = guarded(v2, input_name)
    y4 = run(v4, feed)[output_name]
    if not np.array_equal(y4, y2):
        sys.exit(f"make_versions: the guard changed the outputs: {y4.ravel()} vs {y2.ravel()}")
    x = feed[input_name]
    if x.min() < -4 or x.max() >= 3.5:
        sys.exit(f"make_versions: the test vector's features leave the guard's range: {x.min()}..{x.max()}")

    for version, model, expected in [
        ("2.0.0", v2, y2),
        ("3.0.0", v2, y2 + 1000),
        ("4.0.0", v4, y2),
    ]:
        text = re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', config, count=1)
        # The last `data = [...]` line is the expected output's.
        at = text.rfind("data = [")
        end = text.index("]", at)
        data = ", ".join(repr(float(v)) for v in expected.ravel())
        text = f"{text[:at]}data = [{data}{text[end:]}"
        with open(f"{out}/{version}.onnx", "wb") as f:
            f.write(model.SerializeToString())
        with open(f"{out}/{version}.model.toml", "w") as f:
            f.write(text)
        with open(f"{out}/{version}.ref.json", "w") as f:
            json.dump(
                {
                    "inputs": {input_name: t},
                    "outputs": {output_name: tensor_json(want1["datatype"], run(model, feed)[output_name])},
                },
                f,
            )
        print(f"{version}: {output_name} {[round(float(v), 4) for v in expected.ravel()]}")


main()
