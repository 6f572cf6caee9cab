//! [`backward`]: Candle's `loss.backward()`, with the parameters' gradients passed by hand.
//!
//! Candle's backward adds every gradient an op returns into a fresh tensor of zeros
//! (`GradStore::or_insert`, then `add`), even when it is the only one that tensor gets: for
//! AlexNet's 61 M weights that is a zero fill and an add of 244 MB a step, on top of the kernels
//! that made the gradients (about a tenth of the backward pass on the CPU). Under [`backward`] the
//! conv and linear ops hold back the gradients of their weights and biases ([`hand_over`]), and
//! [`backward`] puts them in the store itself. A plain `loss.backward()` still gets every
//! gradient the usual way: the ops hold nothing back outside [`backward`].

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

thread_local! {
    /// While [`backward`] runs on this thread: the gradients the ops held back, with their
    /// parameters. Candle calls the ops' `bwd` on the thread that called `backward()`.
    static HELD: RefCell<Option<Vec<(Tensor, Tensor)>>> = const { RefCell::new(None) };
}

/// `loss.backward()` without the zero fill and add for the parameters of [`conv2d`](super::conv2d)
/// and [`linear`](super::linear): the same gradients (`0 + g` is `g`, but for the sign of a zero).
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    /// Ends the holding even if Candle's backward fails or panics, so later plain backward
    /// passes on this thread get every gradient.
    struct Holding;
    impl Drop for Holding {
        fn drop(&mut self) {
            HELD.with(|held| held.borrow_mut().take());
        }
    }

    HELD.with(|held| *held.borrow_mut() = Some(Vec::new()));
    let holding = Holding;
    let mut grads = loss.backward()?;
    let held = HELD.with(|held| held.borrow_mut().take()).unwrap_or_default();
    drop(holding);
    for (param, grad) in held {
        // a parameter used more than once, or also by Candle's own ops, sums its gradients
        let sum = match grads.remove(&param) {
            Some(other) => (other + grad)?,
            None => grad,
        };
        grads.insert(&param, sum);
    }
    Ok(grads)
}

/// For an op's `bwd`: the gradient of `param` to return to Candle, or `None` when [`backward`]
/// is running and `param` is a variable (a leaf: nothing in the graph needs its gradient).
pub(crate) fn hand_over(param: &Tensor, grad: Tensor) -> Option<Tensor> {
    if !param.is_variable() {
        return Some(grad);
    }
    HELD.with(|held| match held.borrow_mut().as_mut() {
        Some(held) => {
            held.push((param.clone(), grad));
            None
        }
        None => Some(grad),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A weight used by two convolutions and by one of Candle's own ops gets the sum of all
    /// three gradients, as from `loss.backward()`, and the input's gradient is not held back.
    #[test]
    fn shared_parameters_sum_their_gradients() {
        let dev = Device::Cpu;
        let ramp =
            |n: usize, scale: f64| (Tensor::arange(0f32, n as f32, &dev).unwrap() * scale).unwrap().sin().unwrap();
        let x = Var::from_tensor(&ramp(2 * 3 * 25, 0.7).reshape((2, 3, 5, 5)).unwrap()).unwrap();
        let w = Var::from_tensor(&ramp(3 * 3 * 9, 1.3).reshape((3, 3, 3, 3)).unwrap()).unwrap();
        let b = Var::from_tensor(&ramp(3, 2.1)).unwrap();
        let y = super::super::conv2d_relu(&x, &w, &b, 1, 1).unwrap();
        let y = super::super::conv2d(&y, &w, &b, 1, 1).unwrap();
        let loss = (y.sqr().unwrap().sum_all().unwrap() + w.sqr().unwrap().sum_all().unwrap()).unwrap();

        let held = backward(&loss).unwrap();
        let plain = loss.backward().unwrap();
        for (name, var) in [("x", &x), ("w", &w), ("b", &b)] {
            let (a, e) = (held.get(var).unwrap(), plain.get(var).unwrap());
            let diff = (a - e).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = e.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-6 * scale, "d/d{name}: {diff} (largest {scale})");
        }
        assert!(HELD.with(|held| held.borrow().is_none()), "nothing is held after backward()");
    }
}
