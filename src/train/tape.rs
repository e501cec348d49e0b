//! Reverse-mode automatic differentiation over the CPU engine: a tape that records every forward
//! op with the values its backward needs, then runs the backward kernels of
//! [`crate::compute::cpu::backward`] in reverse.
//!
//! Memory: the backward walks nodes from last to first; every consumer of a node comes after it
//! in forward order, so once a node's gradient has been passed to its inputs, neither its value
//! nor its gradient is needed again and both are freed at once. [`Tape::peak_bytes`] reports the
//! most tensor memory the tape held at any point (forward and backward).
//!
//! Activations are separate nodes (not fused into convolutions as in inference) because their
//! backward needs the pre-activation value; batch norm is the training form with batch
//! statistics.

use crate::compute::cpu::CpuBackend;
use crate::compute::cpu::backward::{self as bw, BatchNormCache};
use crate::compute::{Activation, Backend, ConvSpec, Tensor};
use crate::error::{Error, Result};
use crate::train::dist::Communicator;

/// A value on the tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(usize);

enum Op {
    Leaf,
    Conv {
        x: Var,
        w: Var,
        b: Option<Var>,
        spec: ConvSpec,
    },
    Act {
        x: Var,
        act: Activation,
    },
    BatchNorm {
        x: Var,
        gamma: Var,
        beta: Var,
        cache: BatchNormCache,
        /// Statistics (and the backward's sums) taken over all ranks.
        synced: bool,
    },
    /// Batch norm with fixed statistics (`cache` holds them).
    FrozenBatchNorm {
        x: Var,
        gamma: Var,
        beta: Var,
        cache: BatchNormCache,
    },
    GlobalAvgPool {
        x: Var,
    },
    Scale {
        x: Var,
        s: Var,
    },
    Add {
        a: Var,
        b: Var,
    },
    MaxPool {
        x: Var,
        kernel: usize,
        stride: usize,
    },
    Upsample {
        x: Var,
    },
    Fuse {
        xs: Vec<Var>,
        edges: Var,
        eps: f32,
    },
    DropPath {
        x: Var,
        keep: Vec<bool>,
        keep_prob: f32,
    },
}

struct Node {
    op: Op,
    value: Option<Tensor>,
    requires_grad: bool,
}

/// The gradients of one backward pass, for the leaves created with `requires_grad`.
#[derive(Debug, Default)]
pub struct Gradients {
    grads: Vec<Option<Tensor>>,
}

impl Gradients {
    /// The gradient of `v` (a leaf with `requires_grad`), if the output depended on it.
    pub fn get(&self, v: Var) -> Option<&Tensor> {
        self.grads.get(v.0).and_then(Option::as_ref)
    }
    /// Takes the gradient of `v` out.
    pub fn take(&mut self, v: Var) -> Option<Tensor> {
        self.grads.get_mut(v.0).and_then(Option::take)
    }
}

/// The tape. Create leaves (inputs, parameters), apply ops, then call [`Tape::backward`].
pub struct Tape {
    backend: CpuBackend,
    nodes: Vec<Node>,
    live_bytes: usize,
    peak_bytes: usize,
}

fn bytes(t: &Tensor) -> usize {
    t.len() * std::mem::size_of::<f32>()
}

impl Tape {
    /// An empty tape computing on `backend`.
    pub fn new(backend: CpuBackend) -> Self {
        Tape {
            backend,
            nodes: Vec::new(),
            live_bytes: 0,
            peak_bytes: 0,
        }
    }

    /// Most bytes of tensor data held at once so far.
    pub fn peak_bytes(&self) -> usize {
        self.peak_bytes
    }

    fn push(&mut self, op: Op, value: Tensor, requires_grad: bool) -> Var {
        self.live_bytes += bytes(&value);
        self.peak_bytes = self.peak_bytes.max(self.live_bytes);
        self.nodes.push(Node {
            op,
            value: Some(value),
            requires_grad,
        });
        Var(self.nodes.len() - 1)
    }

    fn node(&self, v: Var) -> Result<&Node> {
        self.nodes.get(v.0).ok_or(Error::Shape {
            op: "tape",
            detail: format!("variable {} is not on this tape", v.0),
        })
    }

    /// The value of `v` (until the backward pass frees it).
    pub fn value(&self, v: Var) -> Result<&Tensor> {
        self.node(v)?.value.as_ref().ok_or(Error::Shape {
            op: "tape",
            detail: format!("variable {} was freed by a backward pass", v.0),
        })
    }

    fn needs(&self, vars: &[Var]) -> Result<bool> {
        let mut any = false;
        for v in vars {
            any |= self.node(*v)?.requires_grad;
        }
        Ok(any)
    }

    /// An input or parameter. Gradients are returned for leaves with `requires_grad`.
    pub fn leaf(&mut self, t: Tensor, requires_grad: bool) -> Var {
        self.push(Op::Leaf, t, requires_grad)
    }

    /// `conv2d(x, w) + b` (no fused activation: apply [`Tape::activation`] after it).
    pub fn conv2d(&mut self, x: Var, w: Var, b: Option<Var>, spec: ConvSpec) -> Result<Var> {
        if spec.act != Activation::None {
            return Err(Error::InvalidArgument(
                "tape convolutions take their activation as a separate op".into(),
            ));
        }
        let y = {
            let bias = match b {
                Some(b) => Some(self.value(b)?),
                None => None,
            };
            self.backend
                .conv2d(self.value(x)?, self.value(w)?, bias, spec, None)?
        };
        let mut deps = vec![x, w];
        deps.extend(b);
        let rg = self.needs(&deps)?;
        Ok(self.push(Op::Conv { x, w, b, spec }, y, rg))
    }

    /// `act(x)`.
    pub fn activation(&mut self, x: Var, act: Activation) -> Result<Var> {
        let y = self.backend.activation(self.value(x)?, act)?;
        let rg = self.needs(&[x])?;
        Ok(self.push(Op::Act { x, act }, y, rg))
    }

    /// Training-mode batch norm (batch statistics). Returns the output and the batch statistics
    /// (for the running-statistics update).
    pub fn batch_norm(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        eps: f32,
    ) -> Result<(Var, BatchNormCache)> {
        self.batch_norm_impl(x, gamma, beta, eps, None)
    }

    /// Synchronised batch norm (PyTorch's `SyncBatchNorm`): the batch statistics are those of
    /// the union of all ranks' batches, gathered through `comm`. Every rank must build the same
    /// graph, and the backward pass must be given a communicator of the same group
    /// ([`Tape::backward_seeds`]).
    pub fn batch_norm_synced(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        eps: f32,
        comm: &mut dyn Communicator,
    ) -> Result<(Var, BatchNormCache)> {
        self.batch_norm_impl(x, gamma, beta, eps, Some(comm))
    }

    fn batch_norm_impl(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        eps: f32,
        comm: Option<&mut dyn Communicator>,
    ) -> Result<(Var, BatchNormCache)> {
        let synced = comm.is_some();
        let (y, cache) = {
            let (xv, g, b) = (self.value(x)?, self.value(gamma)?, self.value(beta)?);
            match comm {
                Some(c) => bw::batch_norm_train_reduced(xv, g.data(), b.data(), eps, &mut |s| {
                    all_reduce_f64(c, s)
                })?,
                None => bw::batch_norm_train(xv, g.data(), b.data(), eps)?,
            }
        };
        let rg = self.needs(&[x, gamma, beta])?;
        let out = self.push(
            Op::BatchNorm {
                x,
                gamma,
                beta,
                cache: cache.clone(),
                synced,
            },
            y,
            rg,
        );
        Ok((out, cache))
    }

    /// Inference-mode batch norm: normalises with the fixed statistics `stats` (the running
    /// mean and variance) instead of the batch's; only `gamma` and `beta` learn.
    pub fn batch_norm_frozen(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        stats: BatchNormCache,
    ) -> Result<Var> {
        let y = {
            let (xv, g, b) = (self.value(x)?, self.value(gamma)?, self.value(beta)?);
            bw::batch_norm_frozen(xv, g.data(), b.data(), &stats)?
        };
        let rg = self.needs(&[x, gamma, beta])?;
        Ok(self.push(
            Op::FrozenBatchNorm {
                x,
                gamma,
                beta,
                cache: stats,
            },
            y,
            rg,
        ))
    }

    /// Mean over H and W.
    pub fn global_avg_pool(&mut self, x: Var) -> Result<Var> {
        let y = self.backend.global_avg_pool(self.value(x)?)?;
        let rg = self.needs(&[x])?;
        Ok(self.push(Op::GlobalAvgPool { x }, y, rg))
    }

    /// `x * s` with `s` of shape `[N, C, 1, 1]`.
    pub fn scale_channels(&mut self, x: Var, s: Var) -> Result<Var> {
        let y = self
            .backend
            .scale_channels(self.value(x)?, self.value(s)?)?;
        let rg = self.needs(&[x, s])?;
        Ok(self.push(Op::Scale { x, s }, y, rg))
    }

    /// `a + b`.
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let y = self.backend.add(self.value(a)?, self.value(b)?)?;
        let rg = self.needs(&[a, b])?;
        Ok(self.push(Op::Add { a, b }, y, rg))
    }

    /// Max pooling, TF-SAME padding.
    pub fn max_pool_same(&mut self, x: Var, kernel: usize, stride: usize) -> Result<Var> {
        let y = self.backend.max_pool_same(self.value(x)?, kernel, stride)?;
        let rg = self.needs(&[x])?;
        Ok(self.push(Op::MaxPool { x, kernel, stride }, y, rg))
    }

    /// Nearest-neighbour resize to `height` x `width`.
    pub fn upsample_nearest(&mut self, x: Var, height: usize, width: usize) -> Result<Var> {
        let y = self
            .backend
            .upsample_nearest(self.value(x)?, height, width)?;
        let rg = self.needs(&[x])?;
        Ok(self.push(Op::Upsample { x }, y, rg))
    }

    /// BiFPN fast normalised fusion `sum_i x_i relu(e_i) / (sum_j relu(e_j) + eps)` with the raw
    /// edge weights `edges` (1-D, one per input) as a differentiable variable.
    pub fn fuse(&mut self, xs: &[Var], edges: Var, eps: f32) -> Result<Var> {
        let e = self.value(edges)?.data().to_vec();
        if e.len() != xs.len() {
            return Err(Error::Shape {
                op: "tape fuse",
                detail: format!("{} inputs, {} edge weights", xs.len(), e.len()),
            });
        }
        let relu: Vec<f32> = e.iter().map(|w| w.max(0.0)).collect();
        let denom = relu.iter().sum::<f32>() + eps;
        let weights: Vec<f32> = relu.iter().map(|w| w / denom).collect();
        let y = {
            let refs = xs
                .iter()
                .map(|v| self.value(*v))
                .collect::<Result<Vec<_>>>()?;
            self.backend
                .weighted_sum(&refs, &weights, Activation::None)?
        };
        let mut deps = xs.to_vec();
        deps.push(edges);
        let rg = self.needs(&deps)?;
        Ok(self.push(
            Op::Fuse {
                xs: xs.to_vec(),
                edges,
                eps,
            },
            y,
            rg,
        ))
    }

    /// Drop-path with a given per-sample keep mask.
    pub fn drop_path(&mut self, x: Var, keep: Vec<bool>, keep_prob: f32) -> Result<Var> {
        let y = bw::drop_path(self.value(x)?, &keep, keep_prob)?;
        let rg = self.needs(&[x])?;
        Ok(self.push(Op::DropPath { x, keep, keep_prob }, y, rg))
    }

    /// Backpropagates `grad_out` (dL/d`out`) through the tape. Frees every non-leaf value on the
    /// way, so the tape can only run one backward pass (leaf values stay readable).
    pub fn backward(&mut self, out: Var, grad_out: Tensor) -> Result<Gradients> {
        self.backward_seeds(vec![(out, grad_out)], None)
    }

    /// Backpropagates from several outputs at once (`(output, dL/d output)` pairs, e.g. the ten
    /// head outputs of a detector). `comm` is required when the tape holds synchronised batch
    /// norms ([`Tape::batch_norm_synced`]); their backward gathers its sums through it.
    pub fn backward_seeds(
        &mut self,
        seeds: Vec<(Var, Tensor)>,
        mut comm: Option<&mut dyn Communicator>,
    ) -> Result<Gradients> {
        let n = self.nodes.len();
        let mut grads: Vec<Option<Tensor>> = (0..n).map(|_| None).collect();
        let mut last = 0;
        for (out, g) in seeds {
            if self.value(out)?.shape() != g.shape() {
                return Err(Error::Shape {
                    op: "tape backward",
                    detail: format!(
                        "gradient {:?} for a value of shape {:?}",
                        g.shape(),
                        self.value(out)?.shape()
                    ),
                });
            }
            last = last.max(out.0);
            match &mut grads[out.0] {
                Some(acc) => add_into(acc, &g),
                slot => {
                    self.live_bytes += bytes(&g);
                    *slot = Some(g);
                }
            }
        }
        self.peak_bytes = self.peak_bytes.max(self.live_bytes);
        for i in (0..n.min(last + 1)).rev() {
            if matches!(self.nodes[i].op, Op::Leaf) || !self.nodes[i].requires_grad {
                continue;
            }
            let Some(g) = grads[i].take() else {
                self.free(i);
                continue;
            };
            let contributions = self.node_backward(i, &g, &mut comm)?;
            self.live_bytes -= bytes(&g);
            for (v, t) in contributions {
                if !self.nodes[v.0].requires_grad {
                    continue;
                }
                match &mut grads[v.0] {
                    Some(acc) => add_into(acc, &t),
                    slot => {
                        self.live_bytes += bytes(&t);
                        *slot = Some(t);
                    }
                }
                self.peak_bytes = self.peak_bytes.max(self.live_bytes);
            }
            self.free(i);
        }
        // Only leaves keep gradients.
        for (i, g) in grads.iter_mut().enumerate() {
            if !matches!(self.nodes[i].op, Op::Leaf) {
                *g = None;
            }
        }
        Ok(Gradients { grads })
    }

    fn free(&mut self, i: usize) {
        if let Some(v) = self.nodes[i].value.take() {
            self.live_bytes -= bytes(&v);
        }
    }

    /// The gradient contributions of node `i` to its inputs, given its output gradient `g`.
    fn node_backward(
        &self,
        i: usize,
        g: &Tensor,
        comm: &mut Option<&mut dyn Communicator>,
    ) -> Result<Vec<(Var, Tensor)>> {
        Ok(match &self.nodes[i].op {
            Op::Leaf => Vec::new(),
            Op::Conv { x, w, b, spec } => {
                let r = bw::conv2d_backward(self.value(*x)?, self.value(*w)?, *spec, g)?;
                let mut v = vec![(*x, r.input), (*w, r.weight)];
                if let Some(b) = b {
                    v.push((*b, r.bias));
                }
                v
            }
            Op::Act { x, act } => vec![(*x, bw::activation_backward(self.value(*x)?, *act, g)?)],
            Op::BatchNorm {
                x,
                gamma,
                beta,
                cache,
                synced,
            } => {
                let gm = self.value(*gamma)?;
                let xv = self.value(*x)?;
                let r = if *synced {
                    let c = comm.as_deref_mut().ok_or_else(|| {
                        Error::InvalidArgument(
                            "the tape holds synchronised batch norms: its backward pass needs \
                             the communicator of their group"
                                .into(),
                        )
                    })?;
                    bw::batch_norm_train_backward_reduced(xv, gm.data(), cache, g, &mut |s| {
                        all_reduce_f64(c, s)
                    })?
                } else {
                    bw::batch_norm_train_backward(xv, gm.data(), cache, g)?
                };
                vec![
                    (*x, r.input),
                    (*gamma, Tensor::new(gm.shape().to_vec(), r.gamma)?),
                    (*beta, Tensor::new(gm.shape().to_vec(), r.beta)?),
                ]
            }
            Op::FrozenBatchNorm {
                x,
                gamma,
                beta,
                cache,
            } => {
                let gm = self.value(*gamma)?;
                let r = bw::batch_norm_frozen_backward(self.value(*x)?, gm.data(), cache, g)?;
                vec![
                    (*x, r.input),
                    (*gamma, Tensor::new(gm.shape().to_vec(), r.gamma)?),
                    (*beta, Tensor::new(gm.shape().to_vec(), r.beta)?),
                ]
            }
            Op::GlobalAvgPool { x } => vec![(
                *x,
                bw::global_avg_pool_backward(self.value(*x)?.shape(), g)?,
            )],
            Op::Scale { x, s } => {
                let (gx, gs) = bw::scale_channels_backward(self.value(*x)?, self.value(*s)?, g)?;
                vec![(*x, gx), (*s, gs)]
            }
            Op::Add { a, b } => vec![(*a, g.clone()), (*b, g.clone())],
            Op::MaxPool { x, kernel, stride } => {
                vec![(
                    *x,
                    bw::max_pool_same_backward(self.value(*x)?, *kernel, *stride, g)?,
                )]
            }
            Op::Upsample { x } => vec![(
                *x,
                bw::upsample_nearest_backward(self.value(*x)?.shape(), g)?,
            )],
            Op::Fuse { xs, edges, eps } => {
                let refs = xs
                    .iter()
                    .map(|v| self.value(*v))
                    .collect::<Result<Vec<_>>>()?;
                let e = self.value(*edges)?;
                let (gxs, ge) = bw::weighted_sum_backward(&refs, e.data(), *eps, g)?;
                let mut v: Vec<(Var, Tensor)> = xs.iter().copied().zip(gxs).collect();
                v.push((*edges, Tensor::new(e.shape().to_vec(), ge)?));
                v
            }
            Op::DropPath { x, keep, keep_prob } => vec![(*x, bw::drop_path(g, keep, *keep_prob)?)],
        })
    }
}

fn add_into(acc: &mut Tensor, t: &Tensor) {
    acc.data_mut()
        .iter_mut()
        .zip(t.data())
        .for_each(|(a, b)| *a += b);
}

/// Sums `sums` over the ranks of `comm` in f64.
fn all_reduce_f64(comm: &mut dyn Communicator, sums: &mut [f64]) -> Result<()> {
    comm.all_reduce_sum_f64(sums)?;
    Ok(())
}
