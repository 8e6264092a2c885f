use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use prost::Message;

use super::super::proto::{data_type, OperatorSetIdProto, TensorProto};
use super::super::testutil::*;
use super::super::{DataType, Dim, LoadError, Model, RunError};

const F: i32 = data_type::FLOAT;

fn x_in(dims: &[i64]) -> Vec<super::super::proto::ValueInfoProto> {
    vec![value("x", F, dims)]
}

#[test]
fn specs_come_from_the_graph_and_skip_initializers() {
    let bytes = model_bytes(
        vec![node("Add", &["x", "b"], &["y"], vec![])],
        vec![value("x", F, &[-1, 2]), value("b", F, &[2])],
        vec![value("y", F, &[-1, 2])],
        vec![tensor_f32("b", &[2], &[1., 2.])],
        17,
    );
    let m = Model::load(&bytes).unwrap();
    assert_eq!(m.inputs().len(), 1);
    assert_eq!(m.inputs()[0].name, "x");
    assert_eq!(m.inputs()[0].datatype, DataType::F32);
    assert_eq!(m.inputs()[0].shape, vec![Dim::Dynamic("batch".into()), Dim::Fixed(2)]);
    assert_eq!(m.outputs()[0].name, "y");
    let x = Tensor::new(&[[1f32, 1.], [2., 2.]], &Device::Cpu).unwrap();
    let out = m.run(&[("x", x)]).unwrap();
    assert_eq!(out[0].0, "y");
    assert_eq!(out[0].1.to_vec2::<f32>().unwrap(), vec![vec![2., 3.], vec![3., 4.]]);
}

#[test]
fn bad_inputs_name_the_input_and_the_expectation() {
    let bytes = model_bytes(
        vec![node("Relu", &["x"], &["y"], vec![])],
        x_in(&[-1, 3]),
        vec![value("y", F, &[-1, 3])],
        vec![],
        17,
    );
    let m = Model::load(&bytes).unwrap();
    let dev = &Device::Cpu;
    let msg = |r: Result<Vec<(String, Tensor)>, RunError>| match r {
        Err(e @ RunError::BadInput { .. }) => e.to_string(),
        other => panic!("expected BadInput, got {other:?}"),
    };
    let wrong_shape = msg(m.run(&[("x", Tensor::zeros((2, 4), DType::F32, dev).unwrap())]));
    assert!(wrong_shape.contains("`x`") && wrong_shape.contains("[batch, 3]"), "{wrong_shape}");
    let wrong_type = msg(m.run(&[("x", Tensor::zeros((2, 3), DType::I64, dev).unwrap())]));
    assert!(wrong_type.contains("expected datatype FP32, got INT64"), "{wrong_type}");
    let missing = msg(m.run(&[]));
    assert!(missing.contains("missing"), "{missing}");
    let unknown = msg(m.run(&[("z", Tensor::zeros((2, 3), DType::F32, dev).unwrap())]));
    assert!(unknown.contains("no such input"), "{unknown}");
    let rank = msg(m.run(&[("x", Tensor::zeros(3, DType::F32, dev).unwrap())]));
    assert!(rank.contains("expected shape"), "{rank}");
}

#[test]
fn garbage_and_versions_are_rejected() {
    assert!(matches!(Model::load(b"\xff\xff\xff"), Err(LoadError::Decode(_))));
    let mut p = model_proto(vec![], x_in(&[1]), x_in(&[1]), vec![], 17);
    p.ir_version = 2;
    assert!(matches!(Model::load(&p.encode_to_vec()), Err(LoadError::IrVersion { found: 2, .. })));
    for opset in [6, 22] {
        let p = model_proto(vec![], x_in(&[1]), x_in(&[1]), vec![], opset);
        let e = Model::load(&p.encode_to_vec()).unwrap_err();
        assert!(matches!(e, LoadError::Opset { found, .. } if found == opset), "{e}");
    }
    let mut p = model_proto(vec![], x_in(&[1]), x_in(&[1]), vec![], 17);
    p.opset_import = vec![OperatorSetIdProto { domain: "com.microsoft".into(), version: 1 }];
    assert!(matches!(Model::load(&p.encode_to_vec()), Err(LoadError::NoOpset)));
    let mut n = node("FusedGemm", &["x"], &["y"], vec![]);
    n.domain = "com.microsoft".into();
    let p = model_proto(vec![n], x_in(&[1]), vec![value("y", F, &[1])], vec![], 17);
    let e = Model::load(&p.encode_to_vec()).unwrap_err();
    assert!(matches!(e, LoadError::UnsupportedDomain { .. }), "{e}");
}

#[test]
fn unsupported_ops_and_external_data_are_load_errors() {
    let bytes = model_bytes(
        vec![node("LSTM", &["x"], &["y"], vec![])],
        x_in(&[1]),
        vec![value("y", F, &[1])],
        vec![],
        17,
    );
    match Model::load(&bytes) {
        Err(LoadError::UnsupportedOp { op, node }) => {
            assert_eq!(op, "LSTM");
            assert_eq!(node, "n_y");
        }
        other => panic!("{other:?}"),
    }
    let mut w = tensor_f32("w", &[1], &[1.]);
    w.raw_data = Default::default();
    w.data_location = 1;
    let bytes = model_bytes(
        vec![node("Add", &["x", "w"], &["y"], vec![])],
        x_in(&[1]),
        vec![value("y", F, &[1])],
        vec![w],
        17,
    );
    assert!(
        matches!(Model::load(&bytes), Err(LoadError::ExternalData { tensor }) if tensor == "w")
    );
    let f16 = TensorProto {
        name: "h".into(),
        data_type: 10,
        dims: vec![1],
        raw_data: vec![0u8, 0].into(),
        ..Default::default()
    };
    let bytes = model_bytes(vec![], x_in(&[1]), x_in(&[1]), vec![f16], 17);
    let e = Model::load(&bytes).unwrap_err();
    assert!(e.to_string().contains("`h`") && e.to_string().contains("FLOAT16"), "{e}");
    let short = TensorProto {
        name: "s".into(),
        data_type: F,
        dims: vec![3],
        raw_data: vec![0u8; 8].into(),
        ..Default::default()
    };
    let bytes = model_bytes(vec![], x_in(&[1]), x_in(&[1]), vec![short], 17);
    assert!(matches!(Model::load(&bytes), Err(LoadError::BadTensor { .. })));
}

#[test]
fn cycles_and_undefined_inputs_name_the_node() {
    let bytes = model_bytes(
        vec![node("Relu", &["b"], &["a"], vec![]), node("Relu", &["a"], &["b"], vec![])],
        x_in(&[1]),
        vec![value("b", F, &[1])],
        vec![],
        17,
    );
    assert!(
        matches!(Model::load(&bytes), Err(LoadError::Cycle { node }) if node.starts_with("n_"))
    );
    let bytes = model_bytes(
        vec![node("Relu", &["nope"], &["y"], vec![])],
        x_in(&[1]),
        vec![value("y", F, &[1])],
        vec![],
        17,
    );
    assert!(matches!(
        Model::load(&bytes),
        Err(LoadError::UndefinedInput { node, input }) if node == "n_y" && input == "nope"
    ));
    let bytes = model_bytes(
        vec![node("Relu", &["x"], &["y"], vec![]), node("Relu", &["x"], &["y"], vec![])],
        x_in(&[1]),
        vec![value("y", F, &[1])],
        vec![],
        17,
    );
    assert!(matches!(Model::load(&bytes), Err(LoadError::DuplicateValue { .. })));
}

#[test]
fn nodes_are_sorted_and_constant_subgraphs_folded() {
    // y = Reshape(x, Concat(Shape(c)[0:1], [-1])) where c is constant: folds to one Reshape.
    let bytes = model_bytes(
        vec![
            node("Reshape", &["x", "shape"], &["y"], vec![]),
            node("Concat", &["first", "minus1"], &["shape"], vec![attr_i("axis", 0)]),
            node("Shape", &["c"], &["s"], vec![]),
            node("Slice", &["s", "zero", "one"], &["first"], vec![]),
            node("Constant", &[], &["minus1"], vec![attr_ints("value_ints", &[-1])]),
        ],
        x_in(&[2, 3]),
        vec![value("y", F, &[2, 3])],
        vec![
            tensor_f32("c", &[2, 5], &[0.; 10]),
            tensor_i64("zero", &[1], &[0]),
            tensor_i64("one", &[1], &[1]),
        ],
        17,
    );
    let m = Model::load(&bytes).unwrap();
    assert_eq!(m.node_count(), 1);
    assert_eq!(m.constants.len(), 1, "only the folded shape stays");
    let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.run(&[("x", x)]).unwrap()[0].1.dims(), &[2, 3]);
}

#[test]
fn batch_norm_folds_into_conv_with_the_same_result() {
    let conv = || node("Conv", &["x", "w", "b"], &["c"], vec![attr_ints("pads", &[1, 1, 1, 1])]);
    let bn = node("BatchNormalization", &["c", "g", "beta", "mean", "var"], &["y"], vec![]);
    let inits = vec![
        tensor_f32(
            "w",
            &[2, 1, 3, 3],
            &(0..18).map(|v| (v as f32 - 9.0) / 10.0).collect::<Vec<_>>(),
        ),
        tensor_f32("b", &[2], &[0.5, -0.5]),
        tensor_f32("g", &[2], &[1.5, 0.5]),
        tensor_f32("beta", &[2], &[0.1, 0.2]),
        tensor_f32("mean", &[2], &[0.3, -0.3]),
        tensor_f32("var", &[2], &[2.0, 0.5]),
    ];
    let folded = Model::load(&model_bytes(
        vec![conv(), bn.clone()],
        x_in(&[1, 1, 4, 4]),
        vec![value("y", F, &[1, 2, 4, 4])],
        inits.clone(),
        17,
    ))
    .unwrap();
    assert_eq!(folded.node_count(), 1);
    // The Conv output is also a graph output here: no folding.
    let unfolded = Model::load(&model_bytes(
        vec![conv(), bn],
        x_in(&[1, 1, 4, 4]),
        vec![value("y", F, &[1, 2, 4, 4]), value("c", F, &[1, 2, 4, 4])],
        inits,
        17,
    ))
    .unwrap();
    assert_eq!(unfolded.node_count(), 2);
    let x = Tensor::new((0..16).map(|v| v as f32 / 7.0).collect::<Vec<_>>(), &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 4, 4))
        .unwrap();
    let a = folded.run(&[("x", x.clone())]).unwrap().remove(0).1;
    let b = unfolded.run(&[("x", x)]).unwrap().remove(0).1;
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}

#[test]
fn intermediates_are_released_after_their_last_use() {
    // x -> a -> b -> y, and a is read again by the last node.
    let bytes = model_bytes(
        vec![
            node("Relu", &["x"], &["a"], vec![]),
            node("Neg", &["a"], &["b"], vec![]),
            node("Add", &["b", "a"], &["y"], vec![]),
        ],
        x_in(&[2]),
        vec![value("y", F, &[2])],
        vec![],
        17,
    );
    let m = Model::load(&bytes).unwrap();
    let frees: Vec<usize> = m.steps.iter().map(|s| s.free_after.len()).collect();
    // x after step 0; nothing after step 1 (a is read again); a and b after step 2.
    assert_eq!(frees, vec![1, 0, 2]);
    let out = m.run(&[("x", Tensor::new(&[1f32, -1.], &Device::Cpu).unwrap())]).unwrap();
    assert_eq!(out[0].1.to_vec1::<f32>().unwrap(), vec![0., 0.]);
}

#[test]
fn one_model_serves_concurrent_runs() {
    let bytes = model_bytes(
        vec![node("Mul", &["x", "x"], &["y"], vec![])],
        x_in(&[-1]),
        vec![value("y", F, &[-1])],
        vec![],
        17,
    );
    let m = Arc::new(Model::load(&bytes).unwrap());
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                let x = Tensor::new(&[i as f32; 3], &Device::Cpu).unwrap();
                m.run(&[("x", x)]).unwrap().remove(0).1.to_vec1::<f32>().unwrap()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), vec![(i * i) as f32; 3]);
    }
}

#[test]
fn run_time_failures_are_errors_not_panics() {
    let bytes = model_bytes(
        vec![node("Gather", &["t", "x"], &["y"], vec![])],
        vec![value("x", data_type::INT64, &[-1])],
        vec![value("y", F, &[-1])],
        vec![tensor_f32("t", &[2], &[1., 2.])],
        17,
    );
    let m = Model::load(&bytes).unwrap();
    let x = Tensor::new(&[5i64], &Device::Cpu).unwrap();
    let e = m.run(&[("x", x)]).unwrap_err();
    assert!(matches!(e, RunError::Op { .. }), "{e}");
    assert!(e.to_string().contains("out of range"), "{e}");
}

/// A small CNN-shaped model touching many ops, for the mutation test.
fn many_ops_model() -> Vec<u8> {
    model_bytes(
        vec![
            node("Conv", &["x", "w"], &["c"], vec![attr_ints("pads", &[1, 1, 1, 1])]),
            node("BatchNormalization", &["c", "g", "b", "m", "v"], &["bn"], vec![]),
            node("Relu", &["bn"], &["r"], vec![]),
            node(
                "Conv",
                &["r", "dw"],
                &["d"],
                vec![attr_i("group", 2), attr_ints("strides", &[2, 2])],
            ),
            node(
                "MaxPool",
                &["d"],
                &["p"],
                vec![attr_ints("kernel_shape", &[2, 2]), attr_i("ceil_mode", 1)],
            ),
            node("GlobalAveragePool", &["p"], &["gp"], vec![]),
            node("Flatten", &["gp"], &["f"], vec![]),
            node("Gemm", &["f", "fc", "fb"], &["logits"], vec![attr_i("transB", 1)]),
            node("Softmax", &["logits"], &["y"], vec![]),
            node("Shape", &["y"], &["s"], vec![]),
            node("Gather", &["s", "zero"], &["n"], vec![]),
            node("Unsqueeze", &["n", "zero1"], &["n1"], vec![]),
            node("Concat", &["n1", "minus1"], &["shape"], vec![attr_i("axis", 0)]),
            node("Reshape", &["y", "shape"], &["z"], vec![]),
        ],
        x_in(&[-1, 1, 6, 6]),
        vec![value("z", F, &[-1, 3])],
        vec![
            tensor_f32("w", &[2, 1, 3, 3], &[0.1; 18]),
            tensor_f32("g", &[2], &[1., 2.]),
            tensor_f32("b", &[2], &[0., 1.]),
            tensor_f32("m", &[2], &[0.5, 0.]),
            tensor_f32("v", &[2], &[1., 4.]),
            tensor_f32("dw", &[2, 1, 3, 3], &[0.2; 18]),
            tensor_f32("fc", &[3, 2], &[1., 2., 3., 4., 5., 6.]),
            tensor_f32("fb", &[3], &[0., 0., 1.]),
            tensor_i64("zero", &[], &[0]),
            tensor_i64("zero1", &[1], &[0]),
            tensor_i64("minus1", &[1], &[-1]),
        ],
        17,
    )
}

#[test]
fn many_ops_model_runs() {
    let m = Model::load(&many_ops_model()).unwrap();
    assert_eq!(m.node_count(), 12, "BatchNormalization and Relu folded into the Conv");
    let x = Tensor::ones((2, 1, 6, 6), DType::F32, &Device::Cpu).unwrap();
    let y = m.run(&[("x", x)]).unwrap().remove(0).1;
    assert_eq!(y.dims(), &[2, 3]);
    let rows: Vec<Vec<f32>> = y.to_vec2().unwrap();
    for r in rows {
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

/// Corrupted models load with an error or run with an error: they never panic.
#[test]
fn corrupted_models_never_panic() {
    let good = many_ops_model();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let x = Tensor::ones((1, 1, 6, 6), DType::F32, &Device::Cpu).unwrap();
    let mut loaded = 0;
    for _ in 0..3000 {
        let mut bytes = good.clone();
        let flips = 1 + next() % 3;
        for _ in 0..flips {
            let i = (next() as usize) % bytes.len();
            bytes[i] = next() as u8;
        }
        if next() % 10 == 0 {
            bytes.truncate((next() as usize) % bytes.len());
        }
        if let Ok(m) = Model::load(&bytes) {
            loaded += 1;
            if let Some(spec) = m.inputs().first() {
                let _ = m.run(&[(spec.name.as_str(), x.clone())]);
            }
        }
    }
    assert!(loaded > 0, "some mutations must still load");
}

#[test]
fn activations_fuse_into_conv_with_the_same_result() {
    let acts: Vec<(&str, Vec<&str>, Vec<super::super::proto::AttributeProto>)> = vec![
        ("Relu", vec!["c"], vec![]),
        ("HardSwish", vec!["c"], vec![]),
        ("HardSigmoid", vec!["c"], vec![attr_f("alpha", 0.3)]),
        ("Clip", vec!["c", "lo", "hi"], vec![]),
    ];
    for group in [1, 2] {
        for (op, inputs, attrs) in &acts {
            let nodes = || {
                vec![
                    node("Conv", &["x", "w", "b"], &["c"], vec![attr_i("group", group)]),
                    node(op, inputs, &["y"], attrs.clone()),
                ]
            };
            let inits = || {
                vec![
                    tensor_f32(
                        "w",
                        &[2, 2 / group, 1, 2],
                        &[0.5, -1., 2., 1., -0.25, 0.75, 1.5, -2.][..8 / group as usize],
                    ),
                    tensor_f32("b", &[2], &[0.25, -0.5]),
                    tensor_f32("lo", &[], &[-0.5]),
                    tensor_f32("hi", &[], &[1.0]),
                ]
            };
            let y = || value("y", F, &[1, 2, 1, 2]);
            let fused =
                Model::load(&model_bytes(nodes(), x_in(&[1, 2, 1, 3]), vec![y()], inits(), 17))
                    .unwrap();
            assert_eq!(fused.node_count(), 1, "{op} fused");
            let plain = Model::load(&model_bytes(
                nodes(),
                x_in(&[1, 2, 1, 3]),
                vec![y(), value("c", F, &[1, 2, 1, 2])],
                inits(),
                17,
            ))
            .unwrap();
            assert_eq!(plain.node_count(), 2);
            let x = Tensor::new(&[-2f32, -0.5, 0.5, 1., 2., 3.], &Device::Cpu)
                .unwrap()
                .reshape((1, 2, 1, 3))
                .unwrap();
            let a: Vec<f32> = fused.run(&[("x", x.clone())]).unwrap()[0]
                .1
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> =
                plain.run(&[("x", x)]).unwrap()[0].1.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{op}, group {group}");
        }
    }
}

#[test]
fn shared_conv_weights_fold_each_batch_norm_separately() {
    let bn = |x: &str, g: &str, y: &str| {
        node("BatchNormalization", &[x, g, "beta", "mean", "var"], &[y], vec![])
    };
    let bytes = model_bytes(
        vec![
            node("Conv", &["x", "w"], &["c1"], vec![]),
            bn("c1", "g1", "y1"),
            node("Conv", &["x", "w"], &["c2"], vec![]),
            bn("c2", "g2", "y2"),
        ],
        x_in(&[1, 1, 1, 1]),
        vec![value("y1", F, &[1, 1, 1, 1]), value("y2", F, &[1, 1, 1, 1])],
        vec![
            tensor_f32("w", &[1, 1, 1, 1], &[1.0]),
            tensor_f32("g1", &[1], &[2.0]),
            tensor_f32("g2", &[1], &[3.0]),
            tensor_f32("beta", &[1], &[0.0]),
            tensor_f32("mean", &[1], &[0.0]),
            tensor_f32("var", &[1], &[1.0 - 1e-5]),
        ],
        17,
    );
    let m = Model::load(&bytes).unwrap();
    assert_eq!(m.node_count(), 2);
    let x = Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let out = m.run(&[("x", x)]).unwrap();
    let v = |i: usize| out[i].1.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    assert!((v(0) - 2.0).abs() < 1e-5 && (v(1) - 3.0).abs() < 1e-5, "{} {}", v(0), v(1));
}

/// A 3x3 Conv whose weight is an initializer runs by Winograd's transform (loaded as
/// such); the same Conv with the weight fed as an input runs unfolded. Both give the
/// same outputs, and a weight two Convs share stays as it is (both read it).
#[test]
fn winograd_convs_match_the_unfolded_ones() {
    let (c, m, h, w) = (32usize, 40usize, 9usize, 10usize);
    let seq = |n: usize, k: usize| -> Vec<f32> {
        (0..n).map(|i| (((i * 37 + k * 11) % 23) as f32 - 11.0) / 13.0).collect()
    };
    let weights = seq(m * c * 9, 1);
    let weight = || tensor_f32("w", &[m as i64, c as i64, 3, 3], &weights);
    let conv =
        |out: &str| node("Conv", &["x", "w"], &[out], vec![attr_ints("pads", &[1, 1, 1, 1])]);
    let x_dims = [1, c as i64, h as i64, w as i64];
    let y = |name: &str| value(name, F, &[1, m as i64, h as i64, w as i64]);
    let transformed =
        Model::load(&model_bytes(vec![conv("y")], x_in(&x_dims), vec![y("y")], vec![weight()], 17))
            .unwrap();
    assert!(matches!(transformed.steps[0].op, super::super::ops::Op::WinogradConv(_)));
    let unfolded = Model::load(&model_bytes(
        vec![conv("y")],
        vec![value("x", F, &x_dims), value("w", F, &[m as i64, c as i64, 3, 3])],
        vec![y("y")],
        vec![],
        17,
    ))
    .unwrap();
    let shared = Model::load(&model_bytes(
        vec![conv("y"), conv("y2")],
        x_in(&x_dims),
        vec![y("y"), y("y2")],
        vec![weight()],
        17,
    ))
    .unwrap();
    assert!(shared.steps.iter().all(|s| matches!(s.op, super::super::ops::Op::Conv(_))));
    let dev = &Device::Cpu;
    let x = Tensor::from_vec(seq(c * h * w, 2), x_dims.map(|d| d as usize).to_vec(), dev).unwrap();
    let wt = Tensor::from_vec(weights.clone(), (m, c, 3, 3), dev).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = flat(&unfolded.run(&[("x", x.clone()), ("w", wt)]).unwrap()[0].1);
    for got in [
        &transformed.run(&[("x", x.clone())]).unwrap()[0].1,
        &shared.run(&[("x", x)]).unwrap()[1].1,
    ] {
        let got = flat(got);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }
}

/// `Relu(Add(Conv(x), r))` loads as one node on every Conv kernel (Winograd, packed, the
/// gemm crate's, depthwise), with the Conv's output on either side of the Add, and gives
/// exactly what the three nodes give; a residual the Add broadcasts (to the Conv's shape
/// or beyond it) gives the broadcast sum.
#[test]
fn residual_adds_fuse_into_conv_with_the_same_result() {
    use super::super::ops::Op;
    let seq = |n: usize, k: usize| -> Vec<f32> {
        (0..n).map(|i| (((i * 37 + k * 11) % 23) as f32 - 11.0) / 13.0).collect()
    };
    struct Case {
        c: usize,
        m: usize,
        k: usize,
        group: usize,
        residual: Vec<usize>,
        conv_first: bool,
        relu: bool,
        /// The form the Conv loads as.
        kind: fn(&Op) -> bool,
    }
    let winograd = |op: &Op| matches!(op, Op::WinogradConv(_));
    let packed = |op: &Op| matches!(op, Op::PackedConv(_));
    let plain = |op: &Op| matches!(op, Op::Conv(_));
    // Depthwise weights are packed where the CPU runs blocks of channels.
    let depthwise = |op: &Op| matches!(op, Op::Conv(_) | Op::PackedConv(_));
    let (h, w) = (9usize, 10usize);
    let case = |c, m, k, group, residual: &[usize], conv_first, relu, kind| Case {
        c,
        m,
        k,
        group,
        residual: residual.to_vec(),
        conv_first,
        relu,
        kind,
    };
    let cases = [
        case(32, 32, 3, 1, &[1, 32, h, w], true, true, winograd),
        case(4, 6, 3, 1, &[1, 6, h, w], false, true, packed),
        case(8, 12, 1, 1, &[1, 12, h, w], true, false, plain),
        case(8, 8, 3, 8, &[1, 8, h, w], false, true, depthwise),
        // Residuals the Add broadcasts: to the Conv's shape, and beyond it.
        case(32, 32, 3, 1, &[1, 32, 1, 1], true, true, winograd),
        case(4, 6, 3, 1, &[2, 6, h, w], true, true, packed),
        case(8, 8, 3, 8, &[1, 1, 1, w], true, false, depthwise),
    ];
    for (i, Case { c, m, k, group, residual: r_dims, conv_first, relu, kind }) in
        cases.into_iter().enumerate()
    {
        let add_inputs: [&str; 2] = if conv_first { ["c", "r"] } else { ["r", "c"] };
        let nodes = || {
            let attrs = vec![attr_i("group", group as i64), attr_ints("pads", &[k as i64 / 2; 4])];
            let mut nodes = vec![
                node("Conv", &["x", "w", "b"], &["c"], attrs),
                node("Add", &add_inputs, &[if relu { "s" } else { "y" }], vec![]),
            ];
            if relu {
                nodes.push(node("Relu", &["s"], &["y"], vec![]));
            }
            nodes
        };
        let w_dims = [m as i64, (c / group) as i64, k as i64, k as i64];
        let inits = || {
            vec![
                tensor_f32("w", &w_dims, &seq(m * c / group * k * k, i)),
                tensor_f32("b", &[m as i64], &seq(m, i + 1)),
            ]
        };
        let dims = |d: &[usize]| d.iter().map(|&d| d as i64).collect::<Vec<_>>();
        let inputs = || {
            vec![value("x", F, &[1, c as i64, h as i64, w as i64]), value("r", F, &dims(&r_dims))]
        };
        let y = || value("y", F, &[-1, m as i64, h as i64, w as i64]);
        let fused = Model::load(&model_bytes(nodes(), inputs(), vec![y()], inits(), 17)).unwrap();
        assert_eq!(fused.node_count(), 1, "case {i}: Add and Relu fused into the Conv");
        assert!(kind(&fused.steps[0].op), "case {i}: {:?}", fused.steps[0].op);
        let apart = Model::load(&model_bytes(
            nodes(),
            inputs(),
            vec![y(), value("c", F, &[1, m as i64, h as i64, w as i64])],
            inits(),
            17,
        ))
        .unwrap();
        assert_eq!(apart.node_count(), 2 + relu as usize, "case {i}");
        let dev = &Device::Cpu;
        let x = Tensor::from_vec(seq(c * h * w, i + 2), (1, c, h, w), dev).unwrap();
        let r = Tensor::from_vec(seq(r_dims.iter().product(), i + 3), r_dims.clone(), dev).unwrap();
        let feeds = [("x", x), ("r", r)];
        let got = &fused.run(&feeds).unwrap()[0].1;
        let want = &apart.run(&feeds).unwrap()[0].1;
        assert_eq!(got.dims(), want.dims(), "case {i}");
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(got), flat(want), "case {i}");
        if relu {
            assert!(flat(got).iter().all(|&v| v >= 0.0), "case {i}: the Relu applies");
        }
    }
}

/// An Add is not fused into a Conv whose other operand comes later, or whose output
/// something else reads too.
#[test]
fn residual_adds_stay_apart_when_they_must() {
    let conv = |out: &str| node("Conv", &["x", "w"], &[out], vec![]);
    let inits = || vec![tensor_f32("w", &[1, 1, 1, 1], &[2.0])];
    let one = || value("y", F, &[1, 1, 1, 1]);
    // `c` is read by the Add and by the Relu.
    let load = |nodes| {
        Model::load(&model_bytes(nodes, x_in(&[1, 1, 1, 1]), vec![one()], inits(), 17)).unwrap()
    };
    let shared = load(vec![
        conv("c"),
        node("Relu", &["c"], &["r"], vec![]),
        node("Add", &["c", "r"], &["y"], vec![]),
    ]);
    assert_eq!(shared.node_count(), 3);
    // Two Convs into one Add: the first's other operand (the second's output) is not
    // ready when it runs, so the Add fuses into the second.
    let two = load(vec![conv("c1"), conv("c2"), node("Add", &["c1", "c2"], &["y"], vec![])]);
    assert_eq!(two.node_count(), 2);
    let x = Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let y = two.run(&[("x", x)]).unwrap()[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(y, [4.0]);
}
