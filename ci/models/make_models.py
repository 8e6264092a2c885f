#!/usr/bin/env python3
"""Makes the test models of basalt-runtime and their reference outputs.

    make_models.py [--bench] [--seed N] [OUT_DIR]      (OUT_DIR: .cache/models)

Writes, for each model NAME, OUT_DIR/NAME.onnx and OUT_DIR/NAME.ref.json: a
fixed random input and onnxruntime's output for it (CPU, one thread), as
{"inputs": {name: {"datatype", "shape", "data"}}, "outputs": {...}} with the
KServe V2 datatype names and the data flattened in row-major order.

The models are built node by node with onnx.helper, opset 17, random weights
from a fixed seed: the same seed gives the same bytes. The weights are scaled
so that activations stay near unit range all the way through (He init, batch
norms whose statistics roughly match their input, residual branches damped),
which keeps the reference outputs meaningful for a 1e-4 relative comparison.

--bench also times each model in onnxruntime (one thread, batch 1, median of
20 runs after warm-up) and prints it.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17: accepted by every onnxruntime since 1.13

V2_DATATYPE = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


class Graph:
    """A graph under construction: nodes, weights, unique names."""

    def __init__(self, name, seed):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.inits = []
        self.counts = {}

    def fresh(self, prefix):
        n = self.counts.get(prefix, 0)
        self.counts[prefix] = n + 1
        return f"{prefix}_{n}"

    def weight(self, prefix, array, dtype=np.float32):
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, prefix=None, **attrs):
        out = self.fresh(prefix or op_type.lower())
        self.nodes.append(
            helper.make_node(op_type, inputs, [out], name=self.fresh("n_" + op_type), **attrs)
        )
        return out

    def rename_last_output(self, name):
        """Gives the output of the last node the graph output's name."""
        node = self.nodes[-1]
        node.output[0] = name
        return name

    # Layers -----------------------------------------------------------------

    def conv(self, x, cin, cout, k, stride=1, pad=None, group=1, bias=False, gain=2.0):
        pad = k // 2 if pad is None else pad
        fan_in = (cin // group) * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k)) * math.sqrt(gain / fan_in)
        inputs = [x, self.weight("conv_w", w)]
        if bias:
            inputs.append(self.weight("conv_b", self.rng.standard_normal(cout) * 0.05))
        return self.op(
            "Conv",
            inputs,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad, pad, pad, pad],
            group=group,
            dilations=[1, 1],
        )

    def batchnorm(self, x, c, gamma=(0.8, 1.2)):
        """BatchNormalization with random scales in the gamma range and random
        statistics for an input of unit scale; calibrate() then scales the
        statistics to the input the layer actually gets."""
        scale = self.rng.uniform(*gamma, c)
        bias = self.rng.standard_normal(c) * 0.1
        mean = self.rng.standard_normal(c) * 0.1
        var = self.rng.uniform(0.7, 1.3, c)
        return self.op(
            "BatchNormalization",
            [
                x,
                self.weight("bn_scale", scale),
                self.weight("bn_bias", bias),
                self.weight("bn_mean", mean),
                self.weight("bn_var", var),
            ],
            epsilon=1e-5,
            momentum=0.9,
        )

    def gemm(self, x, fin, fout, gain=2.0):
        """Gemm as PyTorch exports Linear: weights [out, in], transB=1."""
        w = self.rng.standard_normal((fout, fin)) * math.sqrt(gain / fin)
        b = self.rng.standard_normal(fout) * 0.05
        return self.op(
            "Gemm", [x, self.weight("fc_w", w), self.weight("fc_b", b)], alpha=1.0, beta=1.0, transB=1
        )

    def matmul_bias(self, x, fin, fout, gain=1.0):
        w = self.rng.standard_normal((fin, fout)) * math.sqrt(gain / fin)
        b = self.rng.standard_normal(fout) * 0.02
        y = self.op("MatMul", [x, self.weight("mm_w", w)])
        return self.op("Add", [y, self.weight("mm_b", b)])

    def layernorm(self, x, c):
        scale = self.rng.uniform(0.9, 1.1, c)
        bias = self.rng.standard_normal(c) * 0.02
        return self.op(
            "LayerNormalization",
            [x, self.weight("ln_scale", scale), self.weight("ln_bias", bias)],
            axis=-1,
            epsilon=1e-5,
        )

    def const_i64(self, prefix, values):
        return self.weight(prefix, np.array(values, dtype=np.int64), dtype=np.int64)

    def const_f32(self, prefix, value):
        return self.weight(prefix, np.array(value, dtype=np.float32))

    def model(self, inputs, outputs, doc):
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="basalt-make-models",
            producer_version="1",
            doc_string=doc,
        )
        model.ir_version = IR_VERSION
        return model


# Models ---------------------------------------------------------------------


def make_mlp(seed):
    g = Graph("mlp", seed)
    x = g.op("Relu", [g.gemm("features", 32, 64)])
    x = g.op("Relu", [g.gemm(x, 64, 32)])
    g.gemm(x, 32, 1, gain=1.0)
    g.rename_last_output("quality")
    return g.model(
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("quality", TensorProto.FLOAT, ["batch", 1])],
        "Water-quality virtual sensor: 32 tabular features to one quality score.",
    )


def make_cnn(seed):
    g = Graph("cnn", seed)
    x = g.conv("image", 3, 16, 3)
    x = g.op("Relu", [g.batchnorm(x, 16)])
    x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = g.op("Relu", [g.conv(x, 16, 32, 3, bias=True)])
    x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = g.op("Relu", [g.conv(x, 32, 64, 3, bias=True, gain=1.0)])
    x = g.op("GlobalAveragePool", [x])
    x = g.op("Flatten", [x], axis=1)
    x = g.gemm(x, 64, 10, gain=1.0)
    g.op("Softmax", [x], axis=-1)
    g.rename_last_output("probabilities")
    return g.model(
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 10])],
        "Small image classifier: 32x32 RGB to 10 class probabilities.",
    )


def make_divisible(v, divisor=8):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def make_mobilenetv3(seed):
    """MobileNetV3-small: the layer table of the paper (and torchvision)."""
    g = Graph("mobilenetv3", seed)

    def act(x, kind):
        return g.op("Relu", [x]) if kind == "RE" else g.op("HardSwish", [x])

    def squeeze_excite(x, c):
        sq = make_divisible(c // 4)
        s = g.op("GlobalAveragePool", [x])
        s = g.op("Relu", [g.conv(s, c, sq, 1, bias=True)])
        s = g.conv(s, sq, c, 1, bias=True, gain=1.0)
        s = g.op("HardSigmoid", [s], alpha=1.0 / 6.0, beta=0.5)
        return g.op("Mul", [x, s])

    x = g.conv("image", 3, 16, 3, stride=2)
    x = act(g.batchnorm(x, 16), "HS")
    cin = 16
    # kernel, expanded channels, out channels, squeeze-excite, activation, stride
    table = [
        (3, 16, 16, True, "RE", 2),
        (3, 72, 24, False, "RE", 2),
        (3, 88, 24, False, "RE", 1),
        (5, 96, 40, True, "HS", 2),
        (5, 240, 40, True, "HS", 1),
        (5, 240, 40, True, "HS", 1),
        (5, 120, 48, True, "HS", 1),
        (5, 144, 48, True, "HS", 1),
        (5, 288, 96, True, "HS", 2),
        (5, 576, 96, True, "HS", 1),
        (5, 576, 96, True, "HS", 1),
    ]
    for k, exp, cout, se, nl, stride in table:
        shortcut = x
        y = x
        if exp != cin:
            y = act(g.batchnorm(g.conv(y, cin, exp, 1), exp), nl)
        y = g.conv(y, exp, exp, k, stride=stride, group=exp)
        y = act(g.batchnorm(y, exp), nl)
        if se:
            y = squeeze_excite(y, exp)
        residual = stride == 1 and cin == cout
        y = g.conv(y, exp, cout, 1, gain=1.0)
        # Projection without activation; a damped one on residual blocks.
        y = g.batchnorm(y, cout, gamma=(0.3, 0.5) if residual else (0.8, 1.2))
        if residual:
            y = g.op("Add", [shortcut, y])
        x, cin = y, cout
    x = act(g.batchnorm(g.conv(x, cin, 576, 1), 576), "HS")
    x = g.op("GlobalAveragePool", [x])
    x = g.op("Flatten", [x], axis=1)
    x = g.op("HardSwish", [g.gemm(x, 576, 1024)])
    g.gemm(x, 1024, 1000, gain=1.0)
    g.rename_last_output("logits")
    return g.model(
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])],
        "MobileNetV3-small-shaped classifier, 224x224 RGB to 1000 logits.",
    )


def make_resnet18(seed):
    g = Graph("resnet18", seed)
    x = g.conv("image", 3, 64, 7, stride=2, pad=3)
    x = g.op("Relu", [g.batchnorm(x, 64)])
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for cout, first_stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            stride = first_stride if block == 0 else 1
            y = g.conv(x, cin, cout, 3, stride=stride)
            y = g.op("Relu", [g.batchnorm(y, cout)])
            y = g.conv(y, cout, cout, 3)
            y = g.batchnorm(y, cout, gamma=(0.3, 0.5))
            shortcut = x
            if stride != 1 or cin != cout:
                shortcut = g.conv(x, cin, cout, 1, stride=stride, pad=0, gain=1.0)
                shortcut = g.batchnorm(shortcut, cout)
            x = g.op("Relu", [g.op("Add", [shortcut, y])])
            cin = cout
    x = g.op("GlobalAveragePool", [x])
    x = g.op("Flatten", [x], axis=1)
    g.gemm(x, 512, 1000, gain=1.0)
    g.rename_last_output("logits")
    return g.model(
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])],
        "ResNet18-shaped classifier, 224x224 RGB to 1000 logits.",
    )


def make_transformer(seed):
    """Pre-norm transformer encoder: 2 layers, width 64, 4 heads, MLP 256."""
    g = Graph("transformer", seed)
    seq, width, heads, vocab, hidden = 16, 64, 4, 100, 256
    head = width // heads
    table = g.weight("tok_embedding", g.rng.standard_normal((vocab, width)))
    x = g.op("Gather", [table, "tokens"], axis=0)  # [1, 16, 64]
    pos = g.weight("pos_embedding", g.rng.standard_normal((1, seq, width)) * 0.5)
    x = g.op("Add", [x, pos])
    split_shape = g.const_i64("shape_heads", [1, seq, heads, head])
    merge_shape = g.const_i64("shape_merged", [1, seq, width])
    scale = g.const_f32("attn_scale", 1.0 / math.sqrt(head))
    half = g.const_f32("half", 0.5)
    one = g.const_f32("one", 1.0)
    inv_sqrt2 = g.const_f32("inv_sqrt2", 1.0 / math.sqrt(2.0))

    def heads_of(t):  # [1, 16, 64] -> [1, 4, 16, 16]
        return g.op("Transpose", [g.op("Reshape", [t, split_shape])], perm=[0, 2, 1, 3])

    for _ in range(2):
        h = g.layernorm(x, width)
        q = heads_of(g.matmul_bias(h, width, width))
        k = heads_of(g.matmul_bias(h, width, width))
        v = heads_of(g.matmul_bias(h, width, width))
        kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])
        scores = g.op("Mul", [g.op("MatMul", [q, kt]), scale])
        attn = g.op("Softmax", [scores], axis=-1)
        ctx = g.op("MatMul", [attn, v])  # [1, 4, 16, 16]
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape])
        x = g.op("Add", [x, g.matmul_bias(ctx, width, width, gain=0.5)])

        h = g.layernorm(x, width)
        h = g.matmul_bias(h, width, hidden, gain=2.0)
        # GELU, exact form: 0.5 * h * (1 + erf(h / sqrt(2)))
        erf = g.op("Erf", [g.op("Mul", [h, inv_sqrt2])])
        h = g.op("Mul", [g.op("Mul", [h, half]), g.op("Add", [erf, one])])
        x = g.op("Add", [x, g.matmul_bias(h, hidden, width, gain=0.5)])
    g.layernorm(x, width)
    g.rename_last_output("hidden")
    return g.model(
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, seq])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, seq, width])],
        "Small transformer encoder: 16 tokens of a 100-word vocabulary to 16x64 states.",
    )


def quantize_scale(rms):
    """Rounds a scale to a power of 2^(1/4): a measurement that differs in its
    last bits between CPUs (onnxruntime's kernels differ) still gives the
    same weights, hence the same bytes, but for a vanishing chance."""
    return float(2.0 ** (round(4.0 * math.log2(max(rms, 1e-6))) / 4.0))


def calibrate(model, seed):
    """Scales the running statistics of every BatchNormalization to the
    measured scale (RMS, one number per layer) of its input on a random
    input, so that a deep random network keeps unit-range activations
    instead of blowing up or dying away. Layer by layer in graph order, each
    measured with the ones before it already calibrated; the statistics are
    inputs of one probe session, so that each layer costs one run."""
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if not bns:
        return model
    inits = {t.name: t for t in model.graph.initializer}
    stats = {}
    for n in bns:
        for name in n.input[3:5]:
            stats[name] = numpy_helper.to_array(inits[name]).copy()
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    kept = [t for t in probe.graph.initializer if t.name not in stats]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept)
    for name, value in stats.items():
        probe.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    del probe.graph.output[:]
    for n in bns:
        probe.graph.output.append(helper.make_empty_tensor_value_info(n.input[0]))
    sess = session(probe.SerializeToString())
    feeds = reference_inputs(model, seed + 2000)
    for n in bns:
        (x,) = sess.run([n.input[0]], {**feeds, **stats})
        s = quantize_scale(float(np.sqrt(np.mean(np.square(x.astype(np.float64))))))
        stats[n.input[3]] = stats[n.input[3]] * np.float32(s)
        stats[n.input[4]] = stats[n.input[4]] * np.float32(s * s)
    for name, value in stats.items():
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return model


# name, builder, seed of the weights and of the reference input
MODELS = [
    ("mlp", make_mlp, 101),
    ("cnn", make_cnn, 102),
    ("mobilenetv3", make_mobilenetv3, 103),
    ("resnet18", make_resnet18, 104),
    ("transformer", make_transformer, 105),
]

MLP_REF_BATCH = 3  # the reference exercises the dynamic batch dimension


def reference_inputs(model, seed):
    rng = np.random.default_rng(seed + 1000)
    feeds = {}
    for inp in model.graph.input:
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else MLP_REF_BATCH for d in t.shape.dim]
        if t.elem_type == TensorProto.INT64:
            feeds[inp.name] = rng.integers(0, 100, size=shape, dtype=np.int64)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def bench_inputs(model, feeds):
    """Batch 1 versions of the reference inputs."""
    return {k: v[:1] for k, v in feeds.items()}


def session(path_or_bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])


def tensor_json(array):
    array = np.ascontiguousarray(array)
    if array.dtype not in V2_DATATYPE:
        raise SystemExit(f"make_models: no V2 datatype for {array.dtype}")
    # tolist() gives Python floats (exact float32 values); json writes their repr.
    return {"datatype": V2_DATATYPE[array.dtype], "shape": list(array.shape), "data": array.ravel().tolist()}


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def model_toml(name, ref):
    """The model.toml of a model bundle: name, version, and the reference
    run as the test vector the runtime checks before it serves the model."""
    lines = [
        f'name = "{name}"',
        'version = "1.0.0"',
        f'description = "basalt reference model {name} (random weights)"',
        "",
        "[test]",
        "tolerance = 1e-4",
        "absolute = 1e-5",
    ]
    for kind, tensors in (("input", ref["inputs"]), ("output", ref["outputs"])):
        for t_name, t in tensors.items():
            lines += [
                "",
                f"[[test.{kind}]]",
                f'name = "{t_name}"',
                f'datatype = "{t["datatype"]}"',
                f"shape = {json.dumps(t['shape'])}",
                f"data = {json.dumps(t['data'])}",
            ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", nargs="?", default=".cache/models")
    ap.add_argument("--bench", action="store_true", help="time each model in onnxruntime")
    ap.add_argument("--seed", type=int, default=0, help="added to every model's seed")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    for name, build, seed in MODELS:
        model = calibrate(build(seed + args.seed), seed + args.seed)
        onnx.checker.check_model(model, full_check=True)
        data = model.SerializeToString(deterministic=True)
        path = os.path.join(args.out_dir, name + ".onnx")
        write_atomic(path, data)

        sess = session(path)
        feeds = reference_inputs(model, seed + args.seed)
        out_names = [o.name for o in sess.get_outputs()]
        outs = sess.run(out_names, feeds)
        for o_name, o in zip(out_names, outs):
            if not np.all(np.isfinite(o)):
                raise SystemExit(f"make_models: {name}: non-finite output {o_name}")
        ref = {
            "inputs": {k: tensor_json(v) for k, v in feeds.items()},
            "outputs": {k: tensor_json(v) for k, v in zip(out_names, outs)},
        }
        write_atomic(os.path.join(args.out_dir, name + ".ref.json"), (json.dumps(ref) + "\n").encode())
        write_atomic(os.path.join(args.out_dir, name + ".model.toml"), model_toml(name, ref).encode())

        o = outs[0]
        line = (
            f"{name:12s} {len(data) / 1e6:7.2f} MB {len(model.graph.node):4d} nodes"
            f"  {out_names[0]} {list(o.shape)} rms {float(np.sqrt(np.mean(o.astype(np.float64) ** 2))):.3g}"
            f" max|x| {float(np.max(np.abs(o))):.3g}"
        )
        if args.bench:
            one = bench_inputs(model, feeds)
            for _ in range(3):
                sess.run(out_names, one)
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                sess.run(out_names, one)
                times.append(time.perf_counter() - t0)
            line += f"  onnxruntime {statistics.median(times) * 1e3:.3f} ms (median of 20, 1 thread, batch 1)"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
