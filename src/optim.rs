//! SGD with momentum and weight decay, in the paper's form and in PyTorch's.
//!
//! Paper (section 5), the learning rate inside the velocity:
//!     v <- m v - wd lr w - lr g;   w <- w + v
//! PyTorch (`torch.optim.SGD`, no dampening, no Nesterov), the learning rate outside:
//!     v <- m v + g + wd w;         w <- w - lr v
//! The two agree while lr is constant and differ right after a change of lr: the paper's
//! velocity keeps the old rate's steps, PyTorch's rescales them at once.
//! Caffe's solver is the paper's form. Biases get no weight decay unless `decay_biases`
//! (Caffe's `decay_mult: 0` on biases; PyTorch decays everything it is given).

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateRule {
    Paper,
    Pytorch,
}

#[derive(Debug, Clone, Copy)]
pub struct SgdConfig {
    pub momentum: f64,
    pub weight_decay: f64,
    pub rule: UpdateRule,
    pub decay_biases: bool,
}

/// One parameter and its momentum buffer.
pub struct Slot {
    pub var: Var,
    pub velocity: Tensor,
    is_bias: bool,
}

pub struct Sgd {
    pub config: SgdConfig,
    pub slots: Vec<Slot>,
}

impl Sgd {
    /// `vars`: each parameter with whether it is a bias; velocities start at zero.
    pub fn new(config: SgdConfig, vars: Vec<(Var, bool)>) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(var, is_bias)| Ok(Slot { velocity: var.zeros_like()?, var, is_bias }))
            .collect::<Result<_>>()?;
        Ok(Sgd { config, slots })
    }

    /// One update with learning rate `lr`. A parameter without a gradient is left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let c = self.config;
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.var) else { continue };
            let w = slot.var.as_tensor();
            let wd = if slot.is_bias && !c.decay_biases { 0.0 } else { c.weight_decay };
            match c.rule {
                UpdateRule::Paper => {
                    let v =
                        ((slot.velocity.affine(c.momentum, 0.0)? - w.affine(wd * lr, 0.0)?)? - g.affine(lr, 0.0)?)?;
                    slot.var.set(&(w + &v)?)?;
                    slot.velocity = v.detach(); // no graph back through earlier steps
                }
                UpdateRule::Pytorch => {
                    let v = (slot.velocity.affine(c.momentum, 0.0)? + (g + w.affine(wd, 0.0)?)?)?;
                    slot.var.set(&(w - v.affine(lr, 0.0)?)?)?;
                    slot.velocity = v.detach();
                }
            }
        }
        Ok(())
    }
}
