//! The ops Candle lacks, forward and backward, against PyTorch (tests/fixtures/ops.safetensors,
//! and activations.safetensors for tanh).

mod common;

use alexnet::init::reference_pattern;
use alexnet::ops::{
    adaptive_avg_pool2d, conv2d, conv2d_relu, lrn, lrn_tensor_ops, max_pool2d, max_pool2d_tensor_ops, tanh, Lrn,
};
use candle_core::{Tensor, Var};
use common::*;

/// Runs `op` on fixture input `x`, back-propagates the fixture's output gradient, and checks
/// the output and the input gradient. Returns the output.
fn check_op(name: &str, x: &Tensor, op: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Tensor {
    let f = fixture("ops.safetensors");
    let x = Var::from_tensor(x).unwrap();
    let y = op(&x).unwrap();
    let grad_y = pattern(&format!("{name}.grad"), y.dims(), 1.0);
    let grads = (&y * &grad_y).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close(&format!("{name} forward"), &y, get(&f, &format!("{name}/y")), 1e-6);
    let grad_x = grads.get(&x).expect("input gradient");
    assert_close(&format!("{name} backward"), grad_x, get(&f, &format!("{name}/grad_x")), 1e-5);
    y
}

#[test]
fn reference_pattern_matches_python_bit_for_bit() {
    let f = fixture("ops.safetensors");
    let ours = reference_pattern("features.0.weight", SEED, 64, 0.5);
    assert_eq!(ours, flat(get(&f, "pattern/w")));
}

#[test]
fn lrn_both_conventions_and_an_even_window() {
    let x = pattern("lrn.x", &[2, 7, 5, 4], 40.0);
    let paper = check_op("lrn_paper", &x, |x| lrn(x, Lrn::paper()));
    let caffe = check_op("lrn_caffe", &x, |x| lrn(x, Lrn::caffe()));
    check_op("lrn_even", &x, |x| lrn(x, Lrn { size: 4, alpha: 1e-3, beta: 0.6, k: 1.5 }));
    // The inputs are large enough that the two conventions really differ.
    let diff = rel_error(&flat(&paper), &flat(&caffe));
    assert!(diff > 0.10, "paper vs caffe LRN differ by only {diff}");
    eprintln!("paper vs caffe LRN outputs differ by {:.0}%", 100.0 * diff);
}

#[test]
fn lrn_paper_constants_are_alpha_on_the_sum() {
    assert_eq!(Lrn::paper(), Lrn { size: 5, alpha: 5e-4, beta: 0.75, k: 2.0 });
    assert_eq!(Lrn::caffe(), Lrn { size: 5, alpha: 1e-4, beta: 0.75, k: 1.0 });
}

#[test]
fn max_pool_3_2_backward_sends_ties_where_pytorch_does() {
    for (name, dims) in [("pool_ties", [2, 3, 9, 11]), ("pool_alexnet", [1, 4, 13, 13])] {
        let x = pattern(&format!("{name}.x"), &dims, 2.0).floor().unwrap();
        check_op(name, &x, |x| max_pool2d(x, 3, 2));
    }
}

/// Convolution + bias (+ ReLU) forward and all three gradients: 3x3 stride 1 at 64 images and
/// 5x5 at 8 images of 27x27 (the Winograd forwards and gradients, on CI's 2 cores; see
/// scripts/make_fixtures.py) with partial tiles, and conv1's 11x11 stride 4 (the direct forward).
/// The 5x5 weight gradient by Winograd rounds to about 4e-6 (a direct sum: 8.5e-7), under the
/// gradients' bound.
#[test]
fn conv_forward_and_gradients_match_pytorch() {
    let f = fixture("ops.safetensors");
    // The forward's bound: F(2x2, 5x5)'s transforms (factors up to 5, sixths, fifteenths) round
    // to about 1e-6 of the largest output in float32 (1.1-1.4e-6 in simulations at the best
    // interpolation points, scripts/winograd_matrices.py), where a direct sum rounds to 2e-7.
    const EXACT: f32 = 1e-6;
    const WINOGRAD_5X5: f32 = 2e-6;
    for (name, xs, ws, stride, pad, relu, bound) in [
        ("conv3x3_pad1", [64, 4, 7, 7], [5, 4, 3, 3], 1, 1, true, EXACT),
        ("conv3x3_pad0", [64, 3, 6, 5], [4, 3, 3, 3], 1, 0, false, EXACT),
        ("conv5x5_pad2", [8, 4, 27, 27], [6, 4, 5, 5], 1, 2, true, WINOGRAD_5X5),
        ("conv11_stride4", [2, 3, 35, 31], [4, 3, 11, 11], 4, 2, true, EXACT),
    ] {
        let x = Var::from_tensor(&pattern(&format!("{name}.x"), &xs, 1.0)).unwrap();
        let w = Var::from_tensor(&pattern(&format!("{name}.w"), &ws, 0.5)).unwrap();
        let b = Var::from_tensor(&pattern(&format!("{name}.b"), &[ws[0]], 0.5)).unwrap();
        let op = if relu { conv2d_relu } else { conv2d };
        let y = op(&x, &w, &b, stride, pad).unwrap();
        assert_close(&format!("{name} forward"), &y, get(&f, &format!("{name}/y")), bound);
        let grad_y = pattern(&format!("{name}.grad"), y.dims(), 1.0);
        let grads = (&y * &grad_y).unwrap().sum_all().unwrap().backward().unwrap();
        for (what, var) in [("grad_x", &x), ("grad_w", &w), ("grad_b", &b)] {
            let got = grads.get(var).expect("a gradient");
            assert_close(&format!("{name} {what}"), got, get(&f, &format!("{name}/{what}")), 1e-5);
        }
    }
}

/// PyTorch's rule: a window holding a NaN pools to NaN, wherever in the window it sits.
#[test]
fn max_pool_propagates_nan_like_pytorch() {
    for at in [0, 4, 12, 24] {
        let mut v = vec![1f32; 25];
        v[at] = f32::NAN;
        let x = Tensor::from_vec(v, (1, 1, 5, 5), &candle_core::Device::Cpu).unwrap();
        let y: Vec<f32> = max_pool2d(&x, 3, 2).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let (ry, rx) = (at / 5, at % 5);
        for (i, v) in y.iter().enumerate() {
            let (oy, ox) = (i / 2, i % 2);
            let covers = (oy * 2..oy * 2 + 3).contains(&ry) && (ox * 2..ox * 2 + 3).contains(&rx);
            assert_eq!(v.is_nan(), covers, "NaN at {at}: output {i} = {v}");
        }
    }
}

/// The paths other devices (CUDA) take, run here on the CPU against the same fixtures.
#[test]
fn lrn_and_max_pool_as_tensor_ops_for_other_devices() {
    let x = pattern("lrn.x", &[2, 7, 5, 4], 40.0);
    check_op("lrn_paper", &x, |x| lrn_tensor_ops(x, Lrn::paper()));
    check_op("lrn_caffe", &x, |x| lrn_tensor_ops(x, Lrn::caffe()));
    check_op("lrn_even", &x, |x| lrn_tensor_ops(x, Lrn { size: 4, alpha: 1e-3, beta: 0.6, k: 1.5 }));
    // Forward: the fixtures, ties included. Backward: Candle's `maximum` splits ties, so the
    // gradient is compared where every window's maximum is unique (unrounded pattern values).
    for (name, dims) in [("pool_ties", [2, 3, 9, 11]), ("pool_alexnet", [1, 4, 13, 13])] {
        let x = pattern(&format!("{name}.x"), &dims, 2.0).floor().unwrap();
        let y = max_pool2d_tensor_ops(&x, 3, 2).unwrap();
        assert_close(
            &format!("{name} tensor-ops forward"),
            &y,
            get(&fixture("ops.safetensors"), &format!("{name}/y")),
            0.0,
        );
        let x = Var::from_tensor(&pattern(&format!("{name}.x"), &dims, 2.0)).unwrap();
        let [kernel, ops] = [max_pool2d(&x, 3, 2).unwrap(), max_pool2d_tensor_ops(&x, 3, 2).unwrap()];
        assert_close(&format!("{name} tensor-ops unique maxima"), &ops, &kernel, 0.0);
        let grad_y = pattern(&format!("{name}.grad"), kernel.dims(), 1.0);
        let grad = |y: &Tensor| (y * &grad_y).unwrap().sum_all().unwrap().backward().unwrap().get(&x).unwrap().clone();
        assert_close(&format!("{name} tensor-ops backward"), &grad(&ops), &grad(&kernel), 0.0);
    }
}

#[test]
fn adaptive_avg_pool_shrinking_and_growing() {
    for (name, dims) in [("adaptive_shrink", [2, 3, 13, 11]), ("adaptive_grow", [1, 2, 5, 4])] {
        let x = pattern(&format!("{name}.x"), &dims, 1.0);
        check_op(name, &x, |x| adaptive_avg_pool2d(x, (6, 6)));
    }
}

/// tanh against PyTorch's (SLEEF's vectorised tanhf, at most 1 ulp from the exact value;
/// ours is correctly rounded): every value within 1 ulp of PyTorch's, on a pattern over
/// [-6, 6] and at the ends (zeros, tiny values, 9-10 where f32 tanh becomes 1, inf), and the
/// gradient `g (1 - y^2)` as PyTorch's.
#[test]
fn tanh_forward_and_backward_match_pytorch() {
    let f = fixture("activations.safetensors");
    for (name, x) in
        [("tanh", pattern("tanh.x", &[4, 8, 16, 16], 6.0)), ("tanh_special", get(&f, "tanh_special/x").clone())]
    {
        let x = Var::from_tensor(&x).unwrap();
        let y = tanh(&x).unwrap();
        let (ours, theirs) = (flat(&y), flat(get(&f, &format!("{name}/y"))));
        let mut differ = 0;
        for ((&a, &b), &x) in ours.iter().zip(&theirs).zip(&flat(&x)) {
            assert!(a.to_bits().abs_diff(b.to_bits()) <= 1, "{name}: tanh({x:e}) = {a:e}, PyTorch's {b:e}");
            differ += (a != b) as usize;
        }
        eprintln!("{name}: {differ} of {} values 1 ulp from PyTorch's", ours.len());
        let grad_y = pattern(&format!("{name}.grad"), y.dims(), 1.0);
        let grads = (&y * &grad_y).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(&format!("{name} backward"), grads.get(&x).unwrap(), get(&f, &format!("{name}/grad_x")), 1e-6);
    }
}

/// The tests above again at every instruction-set level this CPU has below its best.
#[test]
fn ops_pass_at_every_isa_level() {
    alexnet::ops::rerun_tests_below_the_best_level("ops_pass_at_every_isa_level");
}
