//! The whole net against PyTorch: logits (also of a model frozen for inference), every
//! intermediate activation and every parameter's gradient for all three presets at full size
//! (fixtures from scripts/make_fixtures.py), and
//! the two-tower form against the grouped-convolution form.

mod common;

use std::collections::HashMap;

use alexnet::ops::{lrn, max_pool2d, Lrn};
use alexnet::{LrnScope, Mode, Placement, Preset};
use candle_core::{Device, Tensor};
use common::*;

const PRESETS: [(Preset, &str); 3] =
    [(Preset::Paper, "paper"), (Preset::Caffe, "caffe"), (Preset::Torchvision, "torchvision")];

#[test]
fn logits_and_every_activation_match_pytorch() {
    for (preset, name) in PRESETS {
        let f = fixture(&format!("{name}.safetensors"));
        let model = reference_model(preset, &Placement::on(&Device::Cpu));
        let (logits, trace) = model.forward_traced(&reference_input(preset), Mode::Eval).unwrap();
        assert_close(&format!("{name} logits"), &logits, get(&f, "logits"), 1e-4);
        assert!(!trace.is_empty());
        for step in &trace {
            let what = format!("{name} {}", step.name);
            assert_matches_summary(&what, &step.output, &f, &format!("act/{}", step.name), 1e-4);
        }
        let expected: usize = f.keys().filter(|k| k.starts_with("act/") && k.ends_with("/stats")).count();
        assert_eq!(trace.len(), expected, "{name}: every PyTorch activation is checked");
        // frozen for inference (packed weights, the fc layers' strips), the whole batch and its
        // first image alone
        let mut frozen = reference_model(preset, &Placement::on(&Device::Cpu));
        frozen.freeze();
        let x = reference_input(preset);
        let want = get(&f, "logits");
        assert_close(&format!("{name} logits, frozen"), &frozen.forward(&x, Mode::Eval).unwrap(), want, 1e-4);
        let one = frozen.forward(&x.narrow(0, 0, 1).unwrap(), Mode::Eval).unwrap();
        assert_close(&format!("{name} logits, frozen, one image"), &one, &want.narrow(0, 0, 1).unwrap(), 1e-4);
    }
}

#[test]
fn gradients_of_every_parameter_match_pytorch() {
    for (preset, name) in PRESETS {
        let f = fixture(&format!("{name}.safetensors"));
        let model = reference_model(preset, &Placement::on(&Device::Cpu));
        let logits = model.forward(&reference_input(preset), Mode::Eval).unwrap();
        let labels = Tensor::new(&LABELS, &Device::Cpu).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
        assert_close(&format!("{name} loss"), &loss.reshape(1).unwrap(), get(&f, "loss"), 1e-5);
        // the training path; Candle's own backward must give the same values
        let grads = alexnet::ops::backward(&loss).unwrap();
        let candle_grads = loss.backward().unwrap();
        let params = model.parameters();
        assert_eq!(params.len(), 16);
        for p in params {
            let grad = p.gather(|v| grads.get(v).cloned()).unwrap().expect("every parameter has a gradient");
            assert_matches_summary(&format!("{name} d/d {}", p.key), &grad, &f, &format!("grad/{}", p.key), 1e-4);
            let candle_grad = p.gather(|v| candle_grads.get(v).cloned()).unwrap().unwrap();
            let diff = (&grad - &candle_grad).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{name} d/d {}: ops::backward against loss.backward()", p.key);
        }
    }
}

/// The paper net written the other way, independently of the model code: whole-layer tensors,
/// Candle's own grouped `conv2d`, LRN over all channels or over each group.
fn grouped_forward(w: &HashMap<String, Tensor>, x: &Tensor, lrn_params: Lrn, per_group_lrn: bool) -> Tensor {
    let conv = |x: &Tensor, name: &str, pad, stride, groups| {
        x.conv2d(&w[&format!("{name}.weight")], pad, stride, 1, groups)
            .unwrap()
            .broadcast_add(&w[&format!("{name}.bias")].reshape((1, (), 1, 1)).unwrap())
            .unwrap()
            .relu()
            .unwrap()
    };
    let linear = |x: &Tensor, name: &str| {
        x.matmul(&w[&format!("{name}.weight")].t().unwrap())
            .unwrap()
            .broadcast_add(&w[&format!("{name}.bias")])
            .unwrap()
    };
    let norm = |x: &Tensor| {
        if per_group_lrn {
            let c = x.dim(1).unwrap() / 2;
            let halves = [x.narrow(1, 0, c).unwrap(), x.narrow(1, c, c).unwrap()];
            Tensor::cat(&[lrn(&halves[0], lrn_params).unwrap(), lrn(&halves[1], lrn_params).unwrap()], 1).unwrap()
        } else {
            lrn(x, lrn_params).unwrap()
        }
    };
    let h = max_pool2d(&norm(&conv(x, "conv1", 0, 4, 1)), 3, 2).unwrap();
    let h = max_pool2d(&norm(&conv(&h, "conv2", 2, 1, 2)), 3, 2).unwrap();
    let h = conv(&h, "conv3", 1, 1, 1);
    let h = conv(&h, "conv4", 1, 1, 2);
    let h = conv(&h, "conv5", 1, 1, 2);
    let h = max_pool2d(&h, 3, 2).unwrap().flatten_from(1).unwrap();
    let h = linear(&h, "fc6").relu().unwrap();
    let h = linear(&h, "fc7").relu().unwrap();
    linear(&h, "fc8")
}

#[test]
fn towers_on_one_device_equal_the_grouped_convolution_form() {
    let x = reference_input(Preset::Paper);
    for scope in [LrnScope::Layer, LrnScope::Tower] {
        let placement = Placement { lrn_scope: scope, ..Placement::on(&Device::Cpu) };
        let model = reference_model(Preset::Paper, &placement);
        let weights: HashMap<String, Tensor> = model.state_dict().unwrap().into_iter().collect();
        let towers = model.forward(&x, Mode::Eval).unwrap();
        let grouped = grouped_forward(&weights, &x, Lrn::paper(), scope == LrnScope::Tower);
        // Candle's grouped conv2d against our GEMM convolution per tower: rounding only.
        assert_close(&format!("towers vs grouped, LRN scope {scope:?}"), &towers, &grouped, 1e-5);
    }
}

#[test]
fn lrn_scope_tower_differs_from_layer_only_near_the_boundary() {
    let x = reference_input(Preset::Paper);
    let run = |scope| {
        let placement = Placement { lrn_scope: scope, ..Placement::on(&Device::Cpu) };
        let (_, trace) = reference_model(Preset::Paper, &placement).forward_traced(&x, Mode::Eval).unwrap();
        trace.into_iter().find(|s| s.name == "norm1").unwrap().output
    };
    let (layer, tower) = (run(LrnScope::Layer), run(LrnScope::Tower));
    let diff = (layer - tower).unwrap().abs().unwrap().sum_keepdim((0, 2, 3)).unwrap().flatten_all().unwrap();
    let per_channel: Vec<f32> = diff.to_vec1().unwrap();
    for (c, d) in per_channel.iter().enumerate() {
        let near_boundary = (46..50).contains(&c);
        assert_eq!(*d > 0.0, near_boundary, "channel {c}: difference {d}");
    }
}

#[test]
fn dropout_is_on_only_in_training() {
    let model = reference_model(Preset::Torchvision, &Placement::on(&Device::Cpu));
    let x = reference_input(Preset::Torchvision).narrow(0, 0, 1).unwrap();
    let eval = [model.forward(&x, Mode::Eval).unwrap(), model.forward(&x, Mode::Eval).unwrap()];
    assert_eq!(flat(&eval[0]), flat(&eval[1]));
    let train = model.forward(&x, Mode::Train { seed: 1 }).unwrap();
    assert_ne!(flat(&eval[0]), flat(&train));
}

/// A frozen model ([`alexnet::AlexNet::freeze`]) gives the same numbers as one that is not, on
/// its first pass (the weights made ready) and after (kept), the same bits on both: at batch 1
/// (the direct convolution in tasks), 2 and 8 (Winograd for the 13x13 maps too). Within a few
/// units of rounding of the unfrozen model's, whose fully-connected layers sum each output in
/// another order (the convolutions' prepared paths give the same bits, as the crate's own tests
/// check).
#[test]
fn a_frozen_model_gives_the_same_numbers() {
    for (preset, name) in PRESETS {
        let placement = Placement::on(&Device::Cpu);
        let (model, mut frozen) = (reference_model(preset, &placement), reference_model(preset, &placement));
        frozen.freeze();
        let x = reference_input(preset);
        let one = x.narrow(0, 0, 1).unwrap();
        let eight = Tensor::cat(&vec![one.clone(); 8], 0).unwrap();
        for (batch, x) in [(1, &one), (x.dim(0).unwrap(), &x), (8, &eight)] {
            let want = flat(&model.forward(x, Mode::Eval).unwrap());
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut first = None;
            for pass in ["first", "second"] {
                let got = flat(&frozen.forward(x, Mode::Eval).unwrap());
                let off = got.iter().zip(&want).fold(0f32, |m, (g, w)| m.max((g - w).abs()));
                assert!(off <= 1e-5 * scale, "{name}, batch {batch}, {pass} frozen pass: {off} off (scale {scale})");
                assert!(first.get_or_insert_with(|| got.clone()) == &got, "{name}, batch {batch}: passes differ");
            }
        }
    }
}

/// The tests above again at every instruction-set level this CPU has below its best.
#[test]
fn the_model_passes_at_every_isa_level() {
    alexnet::ops::rerun_tests_below_the_best_level("the_model_passes_at_every_isa_level");
}
