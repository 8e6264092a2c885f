use candle_core::{DType, Device, Tensor};

use super::super::proto::AttributeProto;
use super::super::team::Team;
use super::super::testutil::*;
use super::*;

fn t(dims: &[usize], data: &[f32]) -> Tensor {
    Tensor::from_vec(data.to_vec(), dims, &Device::Cpu).unwrap()
}

fn ti(dims: &[usize], data: &[i64]) -> Tensor {
    Tensor::from_vec(data.to_vec(), dims, &Device::Cpu).unwrap()
}

fn run_op(
    op: &str,
    attrs: Vec<AttributeProto>,
    opset: i64,
    inputs: &[Option<Tensor>],
) -> R<Vec<Tensor>> {
    let names: Vec<String> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| if t.is_some() { format!("i{i}") } else { String::new() })
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let name = op;
    let n = node(op, &names, &["y"], attrs);
    let op = parse(&n, opset, "test").map_err(|e| OpError(e.to_string()))?;
    let args: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
    // Every op runs on one thread and on two that split every loop, with equal results.
    let one = Team::new(1).install(|| eval(&op, &args));
    let two = Team::new(2).splitting_everything();
    let split = two.install(|| {
        let _hot = two.hot();
        eval(&op, &args)
    });
    match (&one, &split) {
        (Ok(one), Ok(split)) => {
            assert_eq!(one.len(), split.len());
            for (a, b) in one.iter().zip(split) {
                assert_eq!(a.dims(), b.dims(), "{name}");
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
                let (a, b): (Vec<f64>, Vec<f64>) =
                    (flat(a).to_vec1().unwrap(), flat(b).to_vec1().unwrap());
                let same = a.iter().zip(&b).all(|(x, y)| x == y || (x.is_nan() && y.is_nan()));
                assert!(same, "{name}: one thread gave {a:?}, two gave {b:?}");
            }
        }
        // The first line: candle appends a backtrace of the thread that failed.
        (Err(one), Err(split)) => assert_eq!(one.0.lines().next(), split.0.lines().next()),
        _ => panic!("{name}: one thread gave {one:?}, two gave {split:?}"),
    }
    one
}

fn run1(op: &str, attrs: Vec<AttributeProto>, inputs: &[Tensor]) -> Tensor {
    let inputs: Vec<Option<Tensor>> = inputs.iter().cloned().map(Some).collect();
    run_op(op, attrs, 17, &inputs).unwrap().remove(0)
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn ivals(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-5 + 1e-4 * w.abs(), "{got:?} vs {want:?}");
    }
}

#[test]
fn gemm_with_transposes_alpha_beta_and_broadcast_c() {
    let a = t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
    let b = t(&[2, 3], &[1., 0., 1., 0., 1., 0.]); // B' = [[1,0],[0,1],[1,0]]
    let c = t(&[2], &[10., 20.]);
    let attrs = vec![attr_i("transB", 1), attr_f("alpha", 2.0), attr_f("beta", 0.5)];
    let y = run1("Gemm", attrs, &[a.clone(), b, c]);
    assert_eq!(y.dims(), &[2, 2]);
    // A B' = [[4,2],[10,5]]
    close(&vals(&y), &[13., 14., 25., 20.]);
    let at = a.t().unwrap().contiguous().unwrap();
    let y = run1("Gemm", vec![attr_i("transA", 1)], &[at, t(&[3, 1], &[1., 1., 1.])]);
    close(&vals(&y), &[6., 15.]);
}

#[test]
fn matmul_broadcasts_batches_and_vectors() {
    let a = t(&[2, 1, 2], &[1., 2., 3., 4.]);
    let b = t(&[2, 1], &[1., 1.]);
    let y = run1("MatMul", vec![], &[a.clone(), b]);
    assert_eq!(y.dims(), &[2, 1, 1]);
    close(&vals(&y), &[3., 7.]);
    let b3 = t(&[3, 2, 1], &[1., 0., 0., 1., 1., 1.]);
    let y = run1("MatMul", vec![], &[t(&[1, 1, 2], &[1., 2.]), b3]);
    assert_eq!(y.dims(), &[3, 1, 1]);
    close(&vals(&y), &[1., 2., 3.]);
    let v = run1("MatMul", vec![], &[t(&[2], &[1., 2.]), t(&[2, 2], &[1., 2., 3., 4.])]);
    assert_eq!(v.dims(), &[2]);
    close(&vals(&v), &[7., 10.]);
    let v = run1("MatMul", vec![], &[t(&[2, 2], &[1., 2., 3., 4.]), t(&[2], &[1., 1.])]);
    assert_eq!(v.dims(), &[2]);
    close(&vals(&v), &[3., 7.]);
}

#[test]
fn arithmetic_broadcasts_like_numpy() {
    let a = t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
    let b = t(&[3], &[1., 2., 4.]);
    close(&vals(&run1("Add", vec![], &[a.clone(), b.clone()])), &[2., 4., 7., 5., 7., 10.]);
    close(&vals(&run1("Sub", vec![], &[a.clone(), b.clone()])), &[0., 0., -1., 3., 3., 2.]);
    close(&vals(&run1("Mul", vec![], &[a.clone(), b.clone()])), &[1., 4., 12., 4., 10., 24.]);
    close(&vals(&run1("Div", vec![], &[a.clone(), b.clone()])), &[1., 1., 0.75, 4., 2.5, 1.5]);
    let col = t(&[2, 1], &[10., 20.]);
    let y = run1("Add", vec![], &[col, b]);
    assert_eq!(y.dims(), &[2, 3]);
    close(&vals(&y), &[11., 12., 14., 21., 22., 24.]);
    assert!(run_op("Add", vec![], 17, &[Some(a), Some(t(&[2], &[1., 2.]))]).is_err());
}

#[test]
fn pow_handles_negative_bases_and_integer_exponents() {
    let y = run1("Pow", vec![], &[t(&[3], &[-2., 3., 4.]), t(&[], &[2.])]);
    close(&vals(&y), &[4., 9., 16.]);
    let y = run1("Pow", vec![], &[t(&[2], &[4., 9.]), ti(&[], &[3])]);
    close(&vals(&y), &[64., 729.]);
}

#[test]
fn integer_arithmetic_is_checked() {
    let y = run1("Div", vec![], &[ti(&[2], &[7, -7]), ti(&[], &[2])]);
    assert_eq!(ivals(&y), vec![3, -3]);
    let e = run_op("Div", vec![], 17, &[Some(ti(&[1], &[1])), Some(ti(&[1], &[0]))]);
    assert!(e.unwrap_err().0.contains("division by zero"));
    let y = run1("Mul", vec![], &[ti(&[2], &[3, 4]), ti(&[1], &[-1])]);
    assert_eq!(ivals(&y), vec![-3, -4]);
}

#[test]
fn activations_match_reference_values() {
    let x = t(&[4], &[-3., -1., 1., 3.]);
    close(&vals(&run1("Relu", vec![], std::slice::from_ref(&x))), &[0., 0., 1., 3.]);
    close(
        &vals(&run1("Sigmoid", vec![], std::slice::from_ref(&x))),
        &[0.047425874, 0.26894142, 0.7310586, 0.95257413],
    );
    close(
        &vals(&run1("Tanh", vec![], std::slice::from_ref(&x))),
        &[-0.9950548, -0.7615942, 0.7615942, 0.9950548],
    );
    close(
        &vals(&run1("Erf", vec![], std::slice::from_ref(&x))),
        &[-0.9999779, -0.8427008, 0.8427008, 0.9999779],
    );
    close(
        &vals(&run1("HardSwish", vec![], std::slice::from_ref(&x))),
        &[0., -1. / 3., 2. / 3., 3.],
    );
    close(
        &vals(&run1("HardSigmoid", vec![attr_f("alpha", 0.25)], std::slice::from_ref(&x))),
        &[0., 0.25, 0.75, 1.],
    );
    close(
        &vals(&run1("Gelu", vec![], std::slice::from_ref(&x))),
        &[-0.0040496, -0.15865526, 0.8413447, 2.9959502],
    );
    close(
        &vals(&run1("Gelu", vec![attr_s("approximate", "tanh")], &[x])),
        &[-0.0036373, -0.158808, 0.841192, 2.9963627],
    );
}

#[test]
fn clip_takes_bounds_as_inputs_or_attributes() {
    let x = t(&[4], &[-3., -1., 1., 3.]);
    let y =
        run_op("Clip", vec![], 13, &[Some(x.clone()), Some(t(&[], &[-2.])), Some(t(&[], &[2.]))]);
    close(&vals(&y.unwrap()[0]), &[-2., -1., 1., 2.]);
    let y = run_op("Clip", vec![], 13, &[Some(x.clone()), None, Some(t(&[], &[0.]))]);
    close(&vals(&y.unwrap()[0]), &[-3., -1., 0., 0.]);
    let y = run_op("Clip", vec![attr_f("min", 0.0), attr_f("max", 6.0)], 9, &[Some(x)]);
    close(&vals(&y.unwrap()[0]), &[0., 0., 1., 3.]);
}

#[test]
fn softmax_uses_opset_13_axis_semantics() {
    let x = t(&[2, 3], &[1., 2., 3., 1., 1., 1.]);
    let y = run1("Softmax", vec![], std::slice::from_ref(&x));
    close(&vals(&y), &[0.09003057, 0.24472847, 0.66524096, 1. / 3., 1. / 3., 1. / 3.]);
    let y = run1("Softmax", vec![attr_i("axis", 0)], &[t(&[2, 1], &[0., 0.])]);
    close(&vals(&y), &[0.5, 0.5]);
    // Before opset 13, axis=0 flattens everything into one softmax.
    let y = run_op("Softmax", vec![attr_i("axis", 0)], 11, &[Some(t(&[2, 2], &[0., 0., 0., 0.]))]);
    close(&vals(&y.unwrap()[0]), &[0.25; 4]);
    let y = run1("LogSoftmax", vec![], &[t(&[2], &[0., 0.])]);
    close(&vals(&y), &[-std::f32::consts::LN_2; 2]);
}

/// A direct convolution to compare the kernels against.
#[allow(clippy::too_many_arguments)]
fn naive_conv(
    x: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    (m, kh, kw): (usize, usize, usize),
    group: usize,
    stride: (usize, usize),
    dil: (usize, usize),
    pads: (usize, usize, usize, usize),
    out: (usize, usize),
) -> Vec<f32> {
    let cg = c / group;
    let mg = m / group;
    let mut y = vec![0f32; n * m * out.0 * out.1];
    for ni in 0..n {
        for mi in 0..m {
            let g = mi / mg;
            for oy in 0..out.0 {
                for ox in 0..out.1 {
                    let mut s = 0f32;
                    for ci in 0..cg {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * stride.0 + ky * dil.0) as isize - pads.0 as isize;
                                let ix = (ox * stride.1 + kx * dil.1) as isize - pads.1 as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv =
                                    x[((ni * c + g * cg + ci) * h + iy as usize) * w + ix as usize];
                                let wv = wt[((mi * cg + ci) * kh + ky) * kw + kx];
                                s += xv * wv;
                            }
                        }
                    }
                    y[((ni * m + mi) * out.0 + oy) * out.1 + ox] = s;
                }
            }
        }
    }
    y
}

fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

#[test]
fn conv_matches_a_direct_convolution() {
    // (n, c, h, w, m, k, group, stride, dilation, pad)
    let cases = [
        (1, 3, 7, 6, 4, 3, 1, 1, 1, 1),
        (2, 4, 9, 8, 6, 3, 2, 2, 1, 1),
        (1, 4, 8, 8, 4, 3, 4, 1, 1, 1),
        (1, 6, 9, 7, 12, 5, 6, 2, 1, 2),
        (2, 3, 10, 10, 3, 3, 3, 1, 2, 2),
        (1, 5, 6, 6, 7, 1, 1, 1, 1, 0),
        (1, 5, 6, 6, 7, 1, 1, 2, 1, 0),
        (1, 2, 5, 5, 2, 2, 1, 3, 1, 0),
        // Depthwise planes long enough for the blocked tap loops, odd and even pads,
        // strides 1 to 3, a channel multiplier and dilation.
        (1, 8, 29, 31, 8, 5, 8, 2, 1, 2),
        (1, 4, 30, 27, 8, 3, 4, 2, 1, 1),
        (1, 3, 20, 23, 3, 3, 3, 3, 1, 1),
        (1, 5, 40, 40, 5, 3, 5, 1, 1, 1),
        (1, 2, 17, 18, 2, 3, 2, 2, 2, 3),
        (1, 1, 4, 4, 2, 3, 1, 1, 1, 1),
        // Products large enough for several tiles: by output rows, and by channels in
        // blocks of 8 with a shorter last one (in groups, and 1x1 read in place).
        (1, 4, 60, 60, 24, 3, 1, 1, 1, 1),
        (1, 2, 12, 12, 300, 1, 1, 1, 1, 0),
        (2, 6, 33, 35, 44, 3, 2, 2, 1, 1),
        // Depthwise on small planes with many channels, two images, dilation.
        (2, 20, 7, 9, 20, 3, 20, 2, 1, 1),
        (1, 33, 14, 14, 33, 5, 33, 1, 1, 2),
        (1, 17, 9, 8, 17, 3, 17, 1, 2, 2),
    ];
    for (i, &(n, c, h, w, m, k, g, s, d, p)) in cases.iter().enumerate() {
        let xs = pseudo_random(n * c * h * w, i as u32);
        let ws = pseudo_random(m * (c / g) * k * k, 100 + i as u32);
        let eff = (k - 1) * d + 1;
        let out = ((h + 2 * p - eff) / s + 1, (w + 2 * p - eff) / s + 1);
        let want =
            naive_conv(&xs, (n, c, h, w), &ws, (m, k, k), g, (s, s), (d, d), (p, p, p, p), out);
        let attrs = vec![
            attr_i("group", g as i64),
            attr_ints("strides", &[s as i64, s as i64]),
            attr_ints("dilations", &[d as i64, d as i64]),
            attr_ints("pads", &[p as i64; 4]),
            attr_ints("kernel_shape", &[k as i64, k as i64]),
        ];
        let bias = pseudo_random(m, 200 + i as u32);
        // Freed memory of the output's size, full of NaN: an output the kernel leaves
        // unwritten is likely to read as NaN and fail the comparison.
        drop(vec![f32::NAN; n * m * out.0 * out.1]);
        let y = run1(
            "Conv",
            attrs,
            &[t(&[n, c, h, w], &xs), t(&[m, c / g, k, k], &ws), t(&[m], &bias)],
        );
        assert_eq!(y.dims(), &[n, m, out.0, out.1], "case {i}");
        let want: Vec<f32> =
            want.iter().enumerate().map(|(j, v)| v + bias[(j / (out.0 * out.1)) % m]).collect();
        close(&vals(&y), &want);
    }
}

#[test]
fn conv_auto_pad_and_1d() {
    // SAME_UPPER, in 5, k 2, stride 1: pads (0, 1).
    let x = t(&[1, 1, 1, 5], &[1., 2., 3., 4., 5.]);
    let w = t(&[1, 1, 1, 2], &[1., 1.]);
    let y = run1("Conv", vec![attr_s("auto_pad", "SAME_UPPER")], &[x.clone(), w.clone()]);
    close(&vals(&y), &[3., 5., 7., 9., 5.]);
    let y = run1("Conv", vec![attr_s("auto_pad", "SAME_LOWER")], &[x.clone(), w.clone()]);
    close(&vals(&y), &[1., 3., 5., 7., 9.]);
    let y = run1("Conv", vec![attr_s("auto_pad", "VALID"), attr_ints("strides", &[1, 2])], &[x, w]);
    close(&vals(&y), &[3., 7.]);
    // 1-D depthwise with two channels.
    let x = t(&[1, 2, 4], &[1., 2., 3., 4., 10., 20., 30., 40.]);
    let w = t(&[2, 1, 2], &[1., -1., 0.5, 0.5]);
    let y = run1("Conv", vec![attr_i("group", 2)], &[x, w]);
    assert_eq!(y.dims(), &[1, 2, 3]);
    close(&vals(&y), &[-1., -1., -1., 15., 25., 35.]);
}

#[test]
fn batch_normalization_in_inference_mode() {
    let x = t(&[1, 2, 1, 2], &[1., 2., 3., 4.]);
    let y = run1(
        "BatchNormalization",
        vec![attr_f("epsilon", 0.0)],
        &[x, t(&[2], &[1., 2.]), t(&[2], &[0., 1.]), t(&[2], &[1., 3.]), t(&[2], &[1., 4.])],
    );
    // c0: (x-1)/1*1+0, c1: (x-3)/2*2+1
    close(&vals(&y), &[0., 1., 1., 2.]);
}

#[test]
fn max_and_average_pooling() {
    let x = t(&[1, 1, 4, 4], &(1..=16).map(|v| v as f32).collect::<Vec<_>>());
    let k2s2 = || vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("strides", &[2, 2])];
    close(&vals(&run1("MaxPool", k2s2(), std::slice::from_ref(&x))), &[6., 8., 14., 16.]);
    close(&vals(&run1("AveragePool", k2s2(), std::slice::from_ref(&x))), &[3.5, 5.5, 11.5, 13.5]);
    let x3 = t(&[1, 1, 3, 3], &(1..=9).map(|v| v as f32).collect::<Vec<_>>());
    let pad = |inc: i64| {
        vec![
            attr_ints("kernel_shape", &[2, 2]),
            attr_ints("pads", &[1, 1, 1, 1]),
            attr_i("count_include_pad", inc),
        ]
    };
    let y = run1("AveragePool", pad(1), std::slice::from_ref(&x3));
    assert_eq!(y.dims(), &[1, 1, 4, 4]);
    close(&vals(&y)[..2], &[0.25, 0.75]);
    let y = run1("AveragePool", pad(0), std::slice::from_ref(&x3));
    close(&vals(&y)[..2], &[1., 1.5]);
    // ceil_mode: 3x3, k 2, s 2 -> 2x2 with partial windows.
    let ceil = vec![
        attr_ints("kernel_shape", &[2, 2]),
        attr_ints("strides", &[2, 2]),
        attr_i("ceil_mode", 1),
    ];
    let y = run1("MaxPool", ceil.clone(), std::slice::from_ref(&x3));
    close(&vals(&y), &[5., 6., 8., 9.]);
    let y = run1("AveragePool", ceil, std::slice::from_ref(&x3));
    close(&vals(&y), &[3., 4.5, 7.5, 9.]);
    let y = run1(
        "MaxPool",
        vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("pads", &[1, 1, 1, 1])],
        std::slice::from_ref(&x3),
    );
    close(&vals(&y), &[5., 6., 6., 8., 9., 9., 8., 9., 9.]);
    let y = run1("GlobalAveragePool", vec![], std::slice::from_ref(&x3));
    assert_eq!(y.dims(), &[1, 1, 1, 1]);
    close(&vals(&y), &[5.]);
    close(&vals(&run1("GlobalMaxPool", vec![], &[x3])), &[9.]);
}

/// MaxPool against a direct loop, on planes long enough for the blocked tap loops.
#[test]
fn max_pool_matches_a_direct_loop() {
    // (h, w, kernel, stride, pad)
    let cases = [
        (32, 32, 2, 2, 0),
        (31, 29, 3, 2, 1),
        (20, 21, 3, 3, 1),
        (17, 40, 2, 1, 0),
        (9, 9, 3, 2, 0),
        // 2x2 stride 2 without padding runs its own loop; odd sizes drop the last row
        // and column.
        (15, 9, 2, 2, 0),
        (2, 3, 2, 2, 0),
        // On AVX2 by vectors of 8 outputs, the last overlapping the one before.
        (9, 37, 2, 2, 0),
        // Column stride 2 on AVX-512 runs by rows: ResNet's 3x3/2 on wide rows (several
        // vectors and a partial one), a 5-wide window, an even one with padding.
        (23, 112, 3, 2, 1),
        (12, 50, 5, 2, 2),
        (7, 33, 4, 2, 1),
    ];
    for (i, &(h, w, k, s, p)) in cases.iter().enumerate() {
        let c = 3;
        let xs = pseudo_random(c * h * w, 300 + i as u32);
        let out = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let mut want = Vec::new();
        for ci in 0..c {
            for oy in 0..out.0 {
                for ox in 0..out.1 {
                    let mut best = f32::NEG_INFINITY;
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * s + ky) as isize - p as isize;
                            let ix = (ox * s + kx) as isize - p as isize;
                            if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize {
                                best = best.max(xs[(ci * h + iy as usize) * w + ix as usize]);
                            }
                        }
                    }
                    want.push(best);
                }
            }
        }
        let attrs = vec![
            attr_ints("kernel_shape", &[k as i64, k as i64]),
            attr_ints("strides", &[s as i64, s as i64]),
            attr_ints("pads", &[p as i64; 4]),
        ];
        let y = run1("MaxPool", attrs, &[t(&[1, c, h, w], &xs)]);
        assert_eq!(y.dims(), &[1, c, out.0, out.1], "case {i}");
        close(&vals(&y), &want);
    }
}

/// A NaN anywhere in a window wins and a window of -inf gives -inf (docs/decisions.md).
#[test]
fn max_pool_lets_nan_win_and_keeps_minus_infinity() {
    let nan = f32::NAN;
    let inf = f32::INFINITY;
    #[rustfmt::skip]
    let xs = [
        nan, 1., 2., 3., 4., 5., -inf, -inf,
        1., 2., 2., nan, 4., 5., -inf, -inf,
        1., 2., 2., 3., 9., 5., 7., 8.,
        nan, 2., 2., 3., 4., nan, 6., 6.,
    ];
    let attrs = vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("strides", &[2, 2])];
    let y = vals(&run1("MaxPool", attrs, &[t(&[1, 1, 4, 8], &xs)]));
    assert!(y[0].is_nan() && y[1].is_nan() && y[4].is_nan() && y[6].is_nan(), "{y:?}");
    assert_eq!((y[2], y[3], y[5], y[7]), (5., -inf, 3., 8.), "{y:?}");
    // Rows of 8 outputs (each row twice over) run by vectors on AVX2: the same.
    let wide: Vec<f32> = xs.chunks(8).flat_map(|row| row.iter().chain(row)).copied().collect();
    let attrs = vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("strides", &[2, 2])];
    let y2 = vals(&run1("MaxPool", attrs, &[t(&[1, 1, 4, 16], &wide)]));
    assert_eq!(y2.len(), 2 * y.len());
    for (i, (a, b)) in y2.iter().zip(y.chunks(4).flat_map(|row| row.iter().chain(row))).enumerate()
    {
        assert!(a == b || (a.is_nan() && b.is_nan()), "output {i}: {a} vs {b}, {y2:?}");
    }
    // The general path (stride phases, padding that never wins) agrees.
    let attrs = vec![
        attr_ints("kernel_shape", &[3, 3]),
        attr_ints("strides", &[2, 2]),
        attr_ints("pads", &[1, 1, 1, 1]),
    ];
    let y = vals(&run1("MaxPool", attrs.clone(), &[t(&[1, 1, 4, 8], &xs)]));
    assert!(y[0].is_nan() && y[1].is_nan(), "{y:?}");
    assert_eq!(y[3], 5., "{y:?}");
    let y = vals(&run1("MaxPool", attrs, &[t(&[1, 1, 2, 2], &[-inf; 4])]));
    assert_eq!(y, [-inf], "{y:?}");
}

#[test]
fn shape_ops() {
    let x = t(&[2, 3, 4], &(0..24).map(|v| v as f32).collect::<Vec<_>>());
    assert_eq!(run1("Flatten", vec![], std::slice::from_ref(&x)).dims(), &[2, 12]);
    assert_eq!(run1("Flatten", vec![attr_i("axis", 0)], std::slice::from_ref(&x)).dims(), &[1, 24]);
    assert_eq!(run1("Flatten", vec![attr_i("axis", -1)], std::slice::from_ref(&x)).dims(), &[6, 4]);
    assert_eq!(run1("Reshape", vec![], &[x.clone(), ti(&[2], &[0, -1])]).dims(), &[2, 12]);
    assert_eq!(run1("Reshape", vec![], &[x.clone(), ti(&[3], &[-1, 3, 2])]).dims(), &[4, 3, 2]);
    assert!(run_op("Reshape", vec![], 17, &[Some(x.clone()), Some(ti(&[2], &[5, -1]))]).is_err());
    let y = run1("Transpose", vec![attr_ints("perm", &[2, 0, 1])], std::slice::from_ref(&x));
    assert_eq!(y.dims(), &[4, 2, 3]);
    assert_eq!(vals(&y)[..3], [0., 4., 8.]);
    assert_eq!(run1("Transpose", vec![], std::slice::from_ref(&x)).dims(), &[4, 3, 2]);
    let c = run1("Concat", vec![attr_i("axis", -1)], &[t(&[1, 2], &[1., 2.]), t(&[1, 1], &[3.])]);
    close(&vals(&c), &[1., 2., 3.]);
    let s = run1("Shape", vec![], std::slice::from_ref(&x));
    assert_eq!(ivals(&s), vec![2, 3, 4]);
    let s = run1("Shape", vec![attr_i("start", 1), attr_i("end", -1)], std::slice::from_ref(&x));
    assert_eq!(ivals(&s), vec![3]);
    let u = run_op("Unsqueeze", vec![attr_ints("axes", &[0, 3])], 11, &[Some(x.clone())]).unwrap();
    assert_eq!(u[0].dims(), &[1, 2, 3, 1, 4]);
    let u = run1("Unsqueeze", vec![], &[x.clone(), ti(&[1], &[-1])]);
    assert_eq!(u.dims(), &[2, 3, 4, 1]);
    let q = run1("Squeeze", vec![], &[u.clone(), ti(&[1], &[3])]);
    assert_eq!(q.dims(), &[2, 3, 4]);
    let q = run_op("Squeeze", vec![], 11, &[Some(t(&[1, 2, 1], &[1., 2.]))]).unwrap();
    assert_eq!(q[0].dims(), &[2]);
    assert!(run_op("Squeeze", vec![], 17, &[Some(x.clone()), Some(ti(&[1], &[0]))]).is_err());
    let e = run1("Expand", vec![], &[t(&[3, 1], &[1., 2., 3.]), ti(&[2], &[3, 2])]);
    assert_eq!(e.dims(), &[3, 2]);
    close(&vals(&e), &[1., 1., 2., 2., 3., 3.]);
    let e = run1("Expand", vec![], &[t(&[3, 1], &[1., 2., 3.]), ti(&[3], &[2, 1, 2])]);
    assert_eq!(e.dims(), &[2, 3, 2]);
    assert_eq!(run1("Identity", vec![], std::slice::from_ref(&x)).dims(), x.dims());
}

#[test]
fn gather_with_any_index_rank() {
    let data = t(&[3, 2], &[1., 2., 3., 4., 5., 6.]);
    let y = run1("Gather", vec![], &[data.clone(), ti(&[2, 2], &[0, 2, -1, 1])]);
    assert_eq!(y.dims(), &[2, 2, 2]);
    close(&vals(&y), &[1., 2., 5., 6., 5., 6., 3., 4.]);
    let y = run1("Gather", vec![attr_i("axis", 1)], &[data.clone(), ti(&[], &[1])]);
    assert_eq!(y.dims(), &[3]);
    close(&vals(&y), &[2., 4., 6.]);
    assert!(run_op("Gather", vec![], 17, &[Some(data), Some(ti(&[1], &[3]))]).is_err());
}

#[test]
fn cast_truncates_and_makes_booleans() {
    let x = t(&[3], &[1.7, -1.7, 0.0]);
    let y = run1("Cast", vec![attr_i("to", 7)], std::slice::from_ref(&x));
    assert_eq!(ivals(&y), vec![1, -1, 0]);
    let b = run1("Cast", vec![attr_i("to", 9)], &[x]);
    assert_eq!(b.dtype(), DType::U8);
    assert_eq!(b.to_vec1::<u8>().unwrap(), vec![1, 1, 0]);
    let f = run1("Cast", vec![attr_i("to", 1)], &[ti(&[2], &[3, -4])]);
    close(&vals(&f), &[3., -4.]);
}

#[test]
fn layer_normalization_over_the_last_axis() {
    let x = t(&[2, 3], &[1., 2., 3., 2., 2., 2.]);
    let y = run1(
        "LayerNormalization",
        vec![attr_f("epsilon", 0.0)],
        &[x.clone(), t(&[3], &[1., 1., 2.]), t(&[3], &[0., 1., 0.])],
    );
    let r = (2.0f32 / 3.0).sqrt().recip();
    close(&vals(&y)[..3], &[-r, 1., 2. * r]);
    // Constant rows normalize to zero (plus bias) with epsilon.
    let y = run1("LayerNormalization", vec![], &[x, t(&[3], &[1., 1., 1.])]);
    close(&vals(&y)[3..], &[0., 0., 0.]);
}

#[test]
fn reduce_mean_attribute_and_input_forms() {
    let x = t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
    let y = run_op("ReduceMean", vec![attr_ints("axes", &[1])], 13, &[Some(x.clone())]).unwrap();
    assert_eq!(y[0].dims(), &[2, 1]);
    close(&vals(&y[0]), &[2., 5.]);
    let y = run_op(
        "ReduceMean",
        vec![attr_i("keepdims", 0)],
        18,
        &[Some(x.clone()), Some(ti(&[1], &[0]))],
    )
    .unwrap();
    assert_eq!(y[0].dims(), &[3]);
    close(&vals(&y[0]), &[2.5, 3.5, 4.5]);
    let y = run_op("ReduceMean", vec![], 18, &[Some(x.clone())]).unwrap();
    assert_eq!(y[0].dims(), &[1, 1]);
    close(&vals(&y[0]), &[3.5]);
    let y = run_op("ReduceMean", vec![attr_i("noop_with_empty_axes", 1)], 18, &[Some(x.clone())])
        .unwrap();
    assert_eq!(y[0].dims(), &[2, 3]);
    let y = run_op("ReduceSum", vec![attr_i("keepdims", 0)], 13, &[Some(x), Some(ti(&[1], &[-1]))])
        .unwrap();
    close(&vals(&y[0]), &[6., 15.]);
}

#[test]
fn slice_with_steps_and_clamping() {
    let x = t(&[2, 5], &(0..10).map(|v| v as f32).collect::<Vec<_>>());
    let y = run1(
        "Slice",
        vec![],
        &[x.clone(), ti(&[1], &[1]), ti(&[1], &[i64::MAX]), ti(&[1], &[1]), ti(&[1], &[2])],
    );
    close(&vals(&y), &[1., 3., 6., 8.]);
    let y = run1(
        "Slice",
        vec![],
        &[x.clone(), ti(&[1], &[-1]), ti(&[1], &[i64::MIN]), ti(&[1], &[1]), ti(&[1], &[-1])],
    );
    close(&vals(&y), &[4., 3., 2., 1., 0., 9., 8., 7., 6., 5.]);
    let y = run1("Slice", vec![], &[x.clone(), ti(&[2], &[1, 0]), ti(&[2], &[2, 2])]);
    close(&vals(&y), &[5., 6.]);
    let y = run_op(
        "Slice",
        vec![attr_ints("starts", &[2]), attr_ints("ends", &[100]), attr_ints("axes", &[1])],
        9,
        &[Some(x)],
    )
    .unwrap();
    assert_eq!(y[0].dims(), &[2, 3]);
}

#[test]
fn split_equal_and_explicit() {
    let x = t(&[1, 6], &(0..6).map(|v| v as f32).collect::<Vec<_>>());
    let n = node("Split", &["x"], &["a", "b", "c"], vec![attr_i("axis", 1)]);
    let op = parse(&n, 17, "s").unwrap();
    let ys = eval(&op, &[Some(&x)]).unwrap();
    assert_eq!(ys.len(), 3);
    close(&vals(&ys[2]), &[4., 5.]);
    let n = node("Split", &["x", "s"], &["a", "b"], vec![attr_i("axis", -1)]);
    let op = parse(&n, 17, "s").unwrap();
    let ys = eval(&op, &[Some(&x), Some(&ti(&[2], &[1, 5]))]).unwrap();
    assert_eq!(ys[1].dims(), &[1, 5]);
    assert!(eval(&op, &[Some(&x), Some(&ti(&[2], &[1, 4]))]).is_err());
}

#[test]
fn where_comparisons_and_constants() {
    let x = t(&[3], &[1., 5., 3.]);
    let c = run1("Greater", vec![], &[x.clone(), t(&[], &[2.])]);
    let y = run1("Where", vec![], &[c, x, t(&[1], &[0.])]);
    close(&vals(&y), &[0., 5., 3.]);
    let k = run_op("Constant", vec![attr_t("value", tensor_f32("", &[2], &[1.5, 2.5]))], 17, &[])
        .unwrap();
    close(&vals(&k[0]), &[1.5, 2.5]);
    let k = run_op("Constant", vec![attr_ints("value_ints", &[1, 2])], 17, &[]).unwrap();
    assert_eq!(ivals(&k[0]), vec![1, 2]);
    let z = run1(
        "ConstantOfShape",
        vec![attr_t("value", tensor_i64("", &[1], &[7]))],
        &[ti(&[2], &[2, 2])],
    );
    assert_eq!(ivals(&z), vec![7; 4]);
    let z = run1("ConstantOfShape", vec![], &[ti(&[1], &[3])]);
    close(&vals(&z), &[0.; 3]);
    let r = run1("Range", vec![], &[ti(&[], &[10]), ti(&[], &[4]), ti(&[], &[-3])]);
    assert_eq!(ivals(&r), vec![10, 7]);
    let r = run1("Range", vec![], &[t(&[], &[0.]), t(&[], &[1.]), t(&[], &[0.25])]);
    close(&vals(&r), &[0., 0.25, 0.5, 0.75]);
    let a = run1(
        "ArgMax",
        vec![attr_i("axis", 1), attr_i("keepdims", 0)],
        &[t(&[2, 3], &[1., 3., 3., 0., -1., 2.])],
    );
    assert_eq!(ivals(&a), vec![1, 2]);
    let a = run1(
        "ArgMax",
        vec![attr_i("axis", 1), attr_i("select_last_index", 1)],
        &[t(&[2, 3], &[1., 3., 3., 0., -1., 2.])],
    );
    assert_eq!(a.dims(), &[2, 1]);
    assert_eq!(ivals(&a), vec![2, 2]);
}

#[test]
fn bad_attributes_are_load_errors() {
    let n = node("Conv", &["x", "w"], &["y"], vec![attr_s("auto_pad", "BOGUS")]);
    assert!(matches!(parse(&n, 17, "c"), Err(LoadError::BadNode { .. })));
    let n = node("MaxPool", &["x"], &["y"], vec![]);
    assert!(matches!(parse(&n, 17, "p"), Err(LoadError::BadNode { .. })));
    let n = node("Gemm", &["a"], &["y"], vec![]);
    assert!(matches!(parse(&n, 17, "g"), Err(LoadError::BadNode { .. })));
    let n = node("Cast", &["a"], &["y"], vec![attr_i("to", 8)]);
    assert!(matches!(parse(&n, 17, "g"), Err(LoadError::BadNode { .. })));
    let n = node("LSTM", &["a"], &["y"], vec![]);
    assert!(matches!(parse(&n, 17, "l"), Err(LoadError::UnsupportedOp { .. })));
}

#[allow(clippy::too_many_arguments)]
fn naive_conv_transpose(
    x: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    (mg, k): (usize, usize),
    group: usize,
    s: usize,
    d: usize,
    p: usize,
    (oh, ow): (usize, usize),
) -> Vec<f32> {
    let cg = c / group;
    let m = mg * group;
    let mut y = vec![0f32; n * m * oh * ow];
    for ni in 0..n {
        for ci in 0..c {
            let g = ci / cg;
            for iy in 0..h {
                for ix in 0..w {
                    for mm in 0..mg {
                        for ky in 0..k {
                            for kx in 0..k {
                                let oy = (iy * s + ky * d) as isize - p as isize;
                                let ox = (ix * s + kx * d) as isize - p as isize;
                                if oy < 0 || ox < 0 || oy >= oh as isize || ox >= ow as isize {
                                    continue;
                                }
                                let mi = g * mg + mm;
                                y[((ni * m + mi) * oh + oy as usize) * ow + ox as usize] += x
                                    [((ni * c + ci) * h + iy) * w + ix]
                                    * wt[((ci * mg + mm) * k + ky) * k + kx];
                            }
                        }
                    }
                }
            }
        }
    }
    y
}

#[test]
fn conv_transpose_matches_a_direct_scatter() {
    let y =
        run1("ConvTranspose", vec![], &[t(&[1, 1, 2], &[1., 2.]), t(&[1, 1, 3], &[1., 1., 1.])]);
    close(&vals(&y), &[1., 3., 3., 2.]);
    let y = run1(
        "ConvTranspose",
        vec![attr_ints("strides", &[2])],
        &[t(&[1, 1, 2], &[1., 2.]), t(&[1, 1, 3], &[1., 1., 1.])],
    );
    close(&vals(&y), &[1., 1., 3., 2., 2.]);
    // (n, c, h, w, m/group, k, group, stride, dilation, pad)
    let cases = [
        (1, 2, 3, 4, 3, 3, 1, 2, 1, 1),
        (2, 4, 3, 3, 1, 2, 2, 1, 2, 0),
        (1, 3, 4, 4, 1, 4, 3, 2, 1, 1),
    ];
    for (i, &(n, c, h, w, mg, k, g, s, d, p)) in cases.iter().enumerate() {
        let xs = pseudo_random(n * c * h * w, 300 + i as u32);
        let ws = pseudo_random(c * mg * k * k, 400 + i as u32);
        let eff = (k - 1) * d + 1;
        let out = (s * (h - 1) + eff - 2 * p, s * (w - 1) + eff - 2 * p);
        let want = naive_conv_transpose(&xs, (n, c, h, w), &ws, (mg, k), g, s, d, p, out);
        let attrs = vec![
            attr_i("group", g as i64),
            attr_ints("strides", &[s as i64; 2]),
            attr_ints("dilations", &[d as i64; 2]),
            attr_ints("pads", &[p as i64; 4]),
        ];
        let y = run1("ConvTranspose", attrs, &[t(&[n, c, h, w], &xs), t(&[c, mg, k, k], &ws)]);
        assert_eq!(y.dims(), &[n, mg * g, out.0, out.1], "case {i}");
        close(&vals(&y), &want);
    }
    // output_shape with SAME_UPPER-style split: in 3, k 3, s 2 -> full 7, asked 6.
    let y = run1(
        "ConvTranspose",
        vec![
            attr_ints("strides", &[2]),
            attr_ints("output_shape", &[6]),
            attr_s("auto_pad", "SAME_UPPER"),
        ],
        &[t(&[1, 1, 3], &[1., 2., 3.]), t(&[1, 1, 3], &[1., 1., 1.])],
    );
    // full: [1,1,3,2,5,3,3]; total pad 1, begin 0.
    close(&vals(&y), &[1., 1., 3., 2., 5., 3.]);
}

#[test]
fn pad_modes_and_negative_pads() {
    let x = t(&[3], &[1., 2., 3.]);
    let pad = |mode: &str, pads: &[i64]| {
        let y = run1("Pad", vec![attr_s("mode", mode)], &[x.clone(), ti(&[2], pads)]);
        vals(&y)
    };
    close(&pad("constant", &[2, 1]), &[0., 0., 1., 2., 3., 0.]);
    close(&pad("reflect", &[2, 2]), &[3., 2., 1., 2., 3., 2., 1.]);
    close(&pad("edge", &[2, 2]), &[1., 1., 1., 2., 3., 3., 3.]);
    close(&pad("wrap", &[2, 1]), &[2., 3., 1., 2., 3., 1.]);
    close(&pad("constant", &[-1, 1]), &[2., 3., 0.]);
    let y = run1("Pad", vec![], &[t(&[1, 2], &[1., 2.]), ti(&[4], &[0, 1, 1, 0]), t(&[], &[9.])]);
    assert_eq!(y.dims(), &[2, 3]);
    close(&vals(&y), &[9., 1., 2., 9., 9., 9.]);
    let y = run_op("Pad", vec![attr_ints("pads", &[1, 0]), attr_f("value", 5.0)], 9, &[Some(x)])
        .unwrap();
    close(&vals(&y[0]), &[5., 1., 2., 3.]);
}

#[test]
fn top_k_largest_and_smallest() {
    let x = t(&[2, 4], &[1., 3., 2., 3., 0., -1., 5., 4.]);
    let ys = run_op("TopK", vec![], 17, &[Some(x.clone()), Some(ti(&[1], &[2]))]).unwrap();
    close(&vals(&ys[0]), &[3., 3., 5., 4.]);
    assert_eq!(ivals(&ys[1]), vec![1, 3, 2, 3]);
    let ys = run_op(
        "TopK",
        vec![attr_i("largest", 0), attr_i("axis", 0)],
        17,
        &[Some(x.clone()), Some(ti(&[1], &[1]))],
    )
    .unwrap();
    assert_eq!(ys[0].dims(), &[1, 4]);
    close(&vals(&ys[0]), &[0., -1., 2., 3.]);
    assert_eq!(ivals(&ys[1]), vec![1, 1, 0, 0]);
    assert!(run_op("TopK", vec![], 17, &[Some(x), Some(ti(&[1], &[5]))]).is_err());
}

#[test]
fn resize_nearest_and_linear() {
    let x = t(&[1, 1, 2, 2], &[1., 2., 3., 4.]);
    let scales = t(&[4], &[1., 1., 2., 2.]);
    let none = || None::<Tensor>;
    let run = |attrs: Vec<AttributeProto>, scales: Option<Tensor>, sizes: Option<Tensor>| {
        run_op("Resize", attrs, 13, &[Some(x.clone()), none(), scales, sizes]).unwrap().remove(0)
    };
    let y = run(vec![attr_s("mode", "nearest")], Some(scales.clone()), None);
    assert_eq!(y.dims(), &[1, 1, 4, 4]);
    close(&vals(&y)[..8], &[1., 1., 2., 2., 1., 1., 2., 2.]);
    // half_pixel linear, 2 -> 4: sources -0.25, 0.25, 0.75, 1.25 clamped.
    let y = run(vec![attr_s("mode", "linear")], Some(scales), None);
    close(&vals(&y)[..4], &[1., 1.25, 1.75, 2.]);
    let y = run(
        vec![attr_s("mode", "linear"), attr_s("coordinate_transformation_mode", "align_corners")],
        None,
        Some(ti(&[4], &[1, 1, 3, 3])),
    );
    close(&vals(&y), &[1., 1.5, 2., 2., 2.5, 3., 3., 3.5, 4.]);
    // Downscale by sizes with asymmetric nearest.
    let y = run(
        vec![attr_s("coordinate_transformation_mode", "asymmetric")],
        None,
        Some(ti(&[4], &[1, 1, 1, 1])),
    );
    close(&vals(&y), &[1.]);
}

/// `a (m x k) * b (k x n)`, the textbook way.
fn small_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
        }
    }
}

#[test]
fn large_matmul_agrees_with_the_small_kernel() {
    // Large enough for candle's gemm; checked against a plain loop.
    let (b, m, k, n) = (2, 70, 90, 60);
    let a = pseudo_random(b * m * k, 7);
    let w = pseudo_random(k * n, 8);
    let y = run1("MatMul", vec![], &[t(&[b, m, k], &a), t(&[k, n], &w)]);
    assert_eq!(y.dims(), &[b, m, n]);
    let mut want = vec![0f32; b * m * n];
    for i in 0..b {
        small_matmul(
            &a[i * m * k..(i + 1) * m * k],
            &w,
            m,
            k,
            n,
            &mut want[i * m * n..(i + 1) * m * n],
        );
    }
    close(&vals(&y), &want);
    let y = run1("Gemm", vec![attr_i("transB", 1)], &[t(&[m, k], &a[..m * k]), t(&[n, k], &w)]);
    let wt = t(&[n, k], &w).t().unwrap().contiguous().unwrap();
    let wt: Vec<f32> = wt.flatten_all().unwrap().to_vec1().unwrap();
    let mut want = vec![0f32; m * n];
    small_matmul(&a[..m * k], &wt, m, k, n, &mut want);
    close(&vals(&y), &want);
}

#[test]
fn every_listed_op_is_parsed() {
    assert!(SUPPORTED_OPS.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
    for op in SUPPORTED_OPS {
        let n = node(op, &[], &["y"], vec![]);
        let parsed = parse(&n, 17, "n");
        assert!(!matches!(parsed, Err(LoadError::UnsupportedOp { .. })), "{op}");
    }
}

/// Add, Sub, Mul and Div on the engine's own loops (same shapes, one operand repeated
/// over trailing dimensions, either side) and on candle's (other broadcasts) agree with
/// candle's broadcast ops.
#[test]
fn elementwise_arithmetic_matches_candle_broadcasting() {
    let pairs: [(&[usize], &[usize]); 10] = [
        // A bias over the last axes, either side, and over many chunks of the loop.
        (&[1, 4, 5], &[2, 3, 4, 5]),
        (&[7, 300, 13], &[300, 13]),
        (&[1, 13], &[7, 300, 13]),
        (&[2, 3, 4, 5], &[2, 3, 4, 5]),
        (&[2, 3, 4, 5], &[1, 3, 1, 1]),
        (&[3, 1, 1], &[2, 3, 4, 5]),
        (&[2, 3, 4, 5], &[]),
        (&[1], &[2, 3, 4, 5]),
        (&[2, 3, 4, 5], &[4, 5]),
        (&[2, 1, 4, 1], &[3, 1, 5]),
    ];
    for (i, (sa, sb)) in pairs.iter().enumerate() {
        let na: usize = sa.iter().product();
        let nb: usize = sb.iter().product();
        let a = t(sa, &pseudo_random(na, 500 + i as u32));
        // Away from zero, for Div.
        let b: Vec<f32> = pseudo_random(nb, 600 + i as u32).iter().map(|v| v + 3.0).collect();
        let b = t(sb, &b);
        for (op, want) in [
            ("Add", a.broadcast_add(&b).unwrap()),
            ("Sub", a.broadcast_sub(&b).unwrap()),
            ("Mul", a.broadcast_mul(&b).unwrap()),
            ("Div", a.broadcast_div(&b).unwrap()),
        ] {
            let y = run1(op, vec![], &[a.clone(), b.clone()]);
            assert_eq!(y.dims(), want.dims(), "{op} {sa:?} {sb:?}");
            close(&vals(&y), &vals(&want));
        }
    }
}
