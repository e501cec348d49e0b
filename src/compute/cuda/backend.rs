//! [`Backend`] on the GPU: FP16 tensors in device memory (FP32 arithmetic inside every kernel),
//! one launch per op, everything queued on the detector's stream, so a forward pass never
//! waits for the host. The model code (`crate::model`) runs unchanged on it.
//!
//! Convolutions use the direct kernel (`conv.cu`), correct for every shape the network has
//! (regular, strided, depthwise, SAME), except pointwise ones where cuBLAS is faster: those are
//! GEMMs on the tensor cores plus an epilogue kernel ([`super::gemm`]), chosen per shape by
//! timing both the first time the shape runs.

use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use half::f16;

use super::device::{GpuContext, driver_error};
use super::gemm::{ConvChoice, ConvPolicy, PointwiseGemm, PointwiseShape};
use super::kernels::{CONV, ELEMENTWISE};
use super::params::{ConvParams, activation_code};
use crate::compute::{Activation, Backend, ConvSpec, Tensor};
use crate::error::{Error, Result};

/// An FP16 NCHW tensor on the GPU.
pub struct GpuTensor {
    data: CudaSlice<u16>,
    shape: Vec<usize>,
}

impl GpuTensor {
    /// Wraps device memory holding `shape.iter().product()` FP16 values.
    pub fn from_parts(data: CudaSlice<u16>, shape: Vec<usize>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if data.len() < n {
            return Err(Error::InvalidArgument(format!(
                "GPU buffer of {} values cannot hold a {shape:?} tensor",
                data.len()
            )));
        }
        Ok(GpuTensor { data, shape })
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn data(&self) -> &CudaSlice<u16> {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut CudaSlice<u16> {
        &mut self.data
    }
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn dims4(&self, op: &'static str) -> Result<[usize; 4]> {
        match self.shape[..] {
            [n, c, h, w] => Ok([n, c, h, w]),
            _ => Err(Error::Shape {
                op,
                detail: format!("expected a 4-D tensor, got {:?}", self.shape),
            }),
        }
    }
}

struct Kernels {
    conv: CudaFunction,
    bias_act_residual: CudaFunction,
    channel_affine: CudaFunction,
    activation: CudaFunction,
    add: CudaFunction,
    global_avg_pool: CudaFunction,
    scale_channels: CudaFunction,
    max_pool_same: CudaFunction,
    upsample_nearest: CudaFunction,
    weighted_sum: CudaFunction,
}

/// The FP16 NaN that `EFFDET_CUDA_POISON=1` fills new tensors with (no kernel writes it).
const POISON: u16 = 0x7e01;

/// What [`CudaBackend::conv_paths`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvPaths {
    pub cublas: bool,
    pub policy: ConvPolicy,
    pub gemm_shapes: usize,
    pub direct_shapes: usize,
}

/// The CUDA engine's [`Backend`].
pub struct CudaBackend {
    gpu: Arc<GpuContext>,
    k: Kernels,
    /// cuBLAS for pointwise convolutions (`None` without the library).
    gemm: Option<PointwiseGemm>,
    policy: ConvPolicy,
    /// Fill new tensors with [`POISON`] (`EFFDET_CUDA_POISON=1`).
    poison: bool,
}

fn cfg1d(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn launched(name: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| driver_error(&format!("launch {name}"), e)
}

fn same_shape(op: &'static str, a: &GpuTensor, b: &GpuTensor) -> Result<()> {
    if a.shape != b.shape {
        return Err(Error::Shape {
            op,
            detail: format!("shapes {:?} and {:?} differ", a.shape, b.shape),
        });
    }
    Ok(())
}

impl CudaBackend {
    /// Loads the kernels on `gpu` (NVRTC on first use in the process, then the caches).
    pub fn new(gpu: Arc<GpuContext>) -> Result<Self> {
        let e = |name: &str| gpu.function(&ELEMENTWISE, name);
        let k = Kernels {
            conv: gpu.function(&CONV, "conv2d_direct")?,
            bias_act_residual: e("bias_act_residual")?,
            channel_affine: e("channel_affine")?,
            activation: e("activation")?,
            add: e("add")?,
            global_avg_pool: e("global_avg_pool")?,
            scale_channels: e("scale_channels")?,
            max_pool_same: e("max_pool_same")?,
            upsample_nearest: e("upsample_nearest")?,
            weighted_sum: e("weighted_sum")?,
        };
        let policy = ConvPolicy::from_env()?;
        let gemm = if policy == ConvPolicy::Direct {
            None
        } else {
            PointwiseGemm::new(&gpu)?
        };
        Ok(CudaBackend {
            gpu,
            k,
            gemm,
            policy,
            poison: std::env::var("EFFDET_CUDA_POISON").is_ok_and(|v| v == "1"),
        })
    }

    /// Overrides `EFFDET_CUDA_CONV` (tests compare both paths against the CPU).
    pub fn set_conv_policy(&mut self, policy: ConvPolicy) -> Result<()> {
        if policy != ConvPolicy::Direct && self.gemm.is_none() {
            self.gemm = PointwiseGemm::new(&self.gpu)?;
        }
        self.policy = policy;
        Ok(())
    }

    /// Whether pointwise convolutions can use cuBLAS here.
    pub fn has_gemm(&self) -> bool {
        self.gemm.is_some()
    }

    /// Which convolution paths ran: whether cuBLAS is there, the policy, and how many
    /// pointwise shapes (batch size included) chose cuBLAS and how many the direct kernel.
    pub fn conv_paths(&self) -> ConvPaths {
        let (gemm_shapes, direct_shapes) = self.gemm.as_ref().map_or((0, 0), |g| g.counts());
        ConvPaths {
            cublas: self.gemm.is_some(),
            policy: self.policy,
            gemm_shapes,
            direct_shapes,
        }
    }

    /// The direct kernel for `p` into `y` (bias, activation and residual fused).
    fn conv_direct(&self, addrs: [u64; 5], p: &ConvParams, len: usize) -> Result<()> {
        let [xa, wa, ba, ra, ya] = addrs;
        let mut l = self.gpu.stream().launch_builder(&self.k.conv);
        l.arg(&xa).arg(&wa).arg(&ba).arg(&ra).arg(&ya).arg(p);
        // SAFETY: arguments match `conv2d_direct` (five pointers, then ConvParams by value);
        // the addresses belong to tensors alive until the stream has run the launch (the
        // caller keeps inputs and the output).
        unsafe { l.launch(cfg1d(len)) }.map_err(launched("conv2d_direct"))?;
        Ok(())
    }

    /// cuBLAS for the product, then the bias/activation/residual epilogue in place.
    fn conv_gemm(
        &self,
        gemm: &PointwiseGemm,
        shape: PointwiseShape,
        addrs: [u64; 5],
        act: i32,
        len: usize,
    ) -> Result<()> {
        let [xa, wa, ba, ra, ya] = addrs;
        // SAFETY: x is [batch, cin, pixels], w [cout, cin], y [batch, cout, pixels] (checked by
        // ConvParams::new and the caller's allocation), all alive until the stream runs.
        unsafe { gemm.run(shape, xa, wa, ya) }?;
        if ba == 0 && ra == 0 && act == 0 {
            return Ok(());
        }
        let (n, c, hw) = (len as i64, shape.cout as i32, shape.pixels as i64);
        let mut l = self.gpu.stream().launch_builder(&self.k.bias_act_residual);
        l.arg(&ya)
            .arg(&ba)
            .arg(&ra)
            .arg(&n)
            .arg(&c)
            .arg(&hw)
            .arg(&act);
        // SAFETY: arguments match `bias_act_residual` (y in place, bias / residual or null).
        unsafe { l.launch(cfg1d(len)) }.map_err(launched("bias_act_residual"))?;
        Ok(())
    }

    /// Times the direct kernel and the GEMM path on this very convolution (the first time its
    /// shape runs) and returns the faster. Synchronises the stream: a warm-up cost, once per
    /// shape and batch size.
    fn tune(
        &self,
        gemm: &PointwiseGemm,
        shape: PointwiseShape,
        addrs: [u64; 5],
        p: &ConvParams,
        len: usize,
    ) -> Result<ConvChoice> {
        const REPS: usize = 3;
        let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            f()?; // warm-up (first-use costs: cuBLAS heuristics, module loading)
            self.gpu.synchronize()?;
            let t = std::time::Instant::now();
            for _ in 0..REPS {
                f()?;
            }
            self.gpu.synchronize()?;
            Ok(t.elapsed().as_secs_f64())
        };
        let direct = time(&|| self.conv_direct(addrs, p, len))?;
        let blas = time(&|| self.conv_gemm(gemm, shape, addrs, p.act, len))?;
        let choice = if blas < direct {
            ConvChoice::Gemm
        } else {
            ConvChoice::Direct
        };
        tracing::debug!(?shape, direct_s = direct, gemm_s = blas, ?choice, "tuned");
        gemm.record(shape, choice);
        Ok(choice)
    }

    pub fn gpu(&self) -> &Arc<GpuContext> {
        &self.gpu
    }

    /// Device memory for `shape`, left unwritten: every kernel writes each output element.
    /// With `EFFDET_CUDA_POISON=1` (the GPU lane's tests) it is filled with an FP16 NaN
    /// pattern (`0x7e01`) first, so an element a kernel fails to write shows as NaN in every
    /// comparison instead of passing with stale memory that happens to be right.
    pub fn alloc(&self, shape: Vec<usize>) -> Result<GpuTensor> {
        let n: usize = shape.iter().product();
        // SAFETY: u16 has no invalid bit patterns; callers write every element before reading.
        let mut data = unsafe { self.gpu.stream().alloc::<u16>(n.max(1)) }
            .map_err(|e| driver_error(&format!("cuMemAlloc ({shape:?} FP16 tensor)"), e))?;
        if self.poison {
            let (ptr, _sync) = data.device_ptr_mut(self.gpu.stream());
            // SAFETY: `ptr` addresses `data`'s n.max(1) u16 values, on the stream that owns it.
            unsafe {
                cudarc::driver::sys::cuMemsetD16Async(
                    ptr,
                    POISON,
                    n.max(1),
                    self.gpu.stream().cu_stream(),
                )
            }
            .result()
            .map_err(|e| driver_error("cuMemsetD16Async (poison)", e))?;
        }
        Ok(GpuTensor { data, shape })
    }

    fn addr(&self, t: &GpuTensor) -> u64 {
        t.data.device_ptr(self.gpu.stream()).0
    }

    fn opt_addr(&self, t: Option<&GpuTensor>) -> u64 {
        t.map_or(0, |t| self.addr(t))
    }
}

impl Backend for CudaBackend {
    type Tensor = GpuTensor;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn upload(&self, t: &Tensor) -> Result<GpuTensor> {
        let bits: Vec<u16> = t
            .data()
            .iter()
            .map(|&v| f16::from_f32(v).to_bits())
            .collect();
        let data = self
            .gpu
            .stream()
            .clone_htod(&bits)
            .map_err(|e| driver_error("cuMemcpyHtoD (upload)", e))?;
        Ok(GpuTensor {
            data,
            shape: t.shape().to_vec(),
        })
    }

    fn download(&self, t: &GpuTensor) -> Result<Tensor> {
        let bits = self
            .gpu
            .read(&format!("a {:?} tensor", t.shape), &t.data.slice(..t.len()))?;
        Tensor::new(
            t.shape.clone(),
            bits.into_iter()
                .map(|b| f16::from_bits(b).to_f32())
                .collect(),
        )
    }

    fn shape(&self, t: &GpuTensor) -> Vec<usize> {
        t.shape.clone()
    }

    fn conv2d(
        &self,
        x: &GpuTensor,
        weight: &GpuTensor,
        bias: Option<&GpuTensor>,
        spec: ConvSpec,
        residual: Option<&GpuTensor>,
    ) -> Result<GpuTensor> {
        let p = ConvParams::new(x.dims4("conv2d")?, weight.dims4("conv2d weight")?, spec)?;
        let cout = p.cout as usize;
        if let Some(b) = bias
            && b.len() != cout
        {
            return Err(Error::Shape {
                op: "conv2d",
                detail: format!("bias {:?} for {cout} output channels", b.shape),
            });
        }
        let y = self.alloc(vec![p.n as usize, cout, p.oh as usize, p.ow as usize])?;
        if let Some(r) = residual {
            same_shape("conv2d residual", r, &y)?;
        }
        let addrs = [
            self.addr(x),
            self.addr(weight),
            self.opt_addr(bias),
            self.opt_addr(residual),
            self.addr(&y),
        ];
        let pointwise = p.kh == 1
            && p.kw == 1
            && p.stride == 1
            && p.groups == 1
            && p.pad_top == 0
            && p.pad_left == 0
            && (p.oh, p.ow) == (p.h, p.w);
        match (&self.gemm, pointwise, self.policy) {
            (Some(gemm), true, policy) if policy != ConvPolicy::Direct => {
                let shape = PointwiseShape {
                    batch: p.n as usize,
                    cin: p.cin as usize,
                    cout,
                    pixels: (p.h * p.w) as usize,
                };
                let choice = match (policy, gemm.choice(&shape)) {
                    (ConvPolicy::Gemm, _) => ConvChoice::Gemm,
                    (_, Some(c)) => c,
                    _ => self.tune(gemm, shape, addrs, &p, y.len())?,
                };
                match choice {
                    ConvChoice::Gemm => self.conv_gemm(gemm, shape, addrs, p.act, y.len())?,
                    ConvChoice::Direct => self.conv_direct(addrs, &p, y.len())?,
                }
            }
            _ => self.conv_direct(addrs, &p, y.len())?,
        }
        Ok(y)
    }

    fn channel_affine(
        &self,
        x: &GpuTensor,
        scale: &GpuTensor,
        shift: &GpuTensor,
        act: Activation,
    ) -> Result<GpuTensor> {
        let [_, c, h, w] = x.dims4("channel_affine")?;
        if scale.len() != c || shift.len() != c {
            return Err(Error::Shape {
                op: "channel_affine",
                detail: format!(
                    "{c} channels, scale {:?}, shift {:?}",
                    scale.shape, shift.shape
                ),
            });
        }
        let y = self.alloc(x.shape.clone())?;
        let (n, ci, hw, a) = (
            y.len() as i64,
            c as i32,
            (h * w) as i64,
            activation_code(act),
        );
        let (xa, sa, ta, ya) = (
            self.addr(x),
            self.addr(scale),
            self.addr(shift),
            self.addr(&y),
        );
        let mut l = self.gpu.stream().launch_builder(&self.k.channel_affine);
        l.arg(&xa)
            .arg(&ya)
            .arg(&sa)
            .arg(&ta)
            .arg(&n)
            .arg(&ci)
            .arg(&hw)
            .arg(&a);
        // SAFETY: arguments match `channel_affine`.
        unsafe { l.launch(cfg1d(y.len())) }.map_err(launched("channel_affine"))?;
        Ok(y)
    }

    fn activation(&self, x: &GpuTensor, act: Activation) -> Result<GpuTensor> {
        let y = self.alloc(x.shape.clone())?;
        let (n, a) = (y.len() as i64, activation_code(act));
        let (xa, ya) = (self.addr(x), self.addr(&y));
        let mut l = self.gpu.stream().launch_builder(&self.k.activation);
        l.arg(&xa).arg(&ya).arg(&n).arg(&a);
        // SAFETY: arguments match `activation`.
        unsafe { l.launch(cfg1d(y.len())) }.map_err(launched("activation"))?;
        Ok(y)
    }

    fn global_avg_pool(&self, x: &GpuTensor) -> Result<GpuTensor> {
        let [n, c, h, w] = x.dims4("global_avg_pool")?;
        let y = self.alloc(vec![n, c, 1, 1])?;
        let (planes, hw) = ((n * c) as i64, (h * w) as i64);
        let (xa, ya) = (self.addr(x), self.addr(&y));
        let mut l = self.gpu.stream().launch_builder(&self.k.global_avg_pool);
        l.arg(&xa).arg(&ya).arg(&planes).arg(&hw);
        // A block of 256 threads (a multiple of 32, as block_sum needs) per plane.
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(n * c).map_err(|_| Error::Shape {
                    op: "global_avg_pool",
                    detail: format!("{} planes exceed a CUDA grid", n * c),
                })?,
                1,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match `global_avg_pool`; one block per plane.
        unsafe { l.launch(cfg) }.map_err(launched("global_avg_pool"))?;
        Ok(y)
    }

    fn scale_channels(&self, x: &GpuTensor, s: &GpuTensor) -> Result<GpuTensor> {
        let [n, c, h, w] = x.dims4("scale_channels")?;
        if s.len() != n * c {
            return Err(Error::Shape {
                op: "scale_channels",
                detail: format!("input {:?}, scales {:?}", x.shape, s.shape),
            });
        }
        let y = self.alloc(x.shape.clone())?;
        let (len, hw) = (y.len() as i64, (h * w) as i64);
        let (xa, sa, ya) = (self.addr(x), self.addr(s), self.addr(&y));
        let mut l = self.gpu.stream().launch_builder(&self.k.scale_channels);
        l.arg(&xa).arg(&sa).arg(&ya).arg(&len).arg(&hw);
        // SAFETY: arguments match `scale_channels`.
        unsafe { l.launch(cfg1d(y.len())) }.map_err(launched("scale_channels"))?;
        Ok(y)
    }

    fn add(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        same_shape("add", a, b)?;
        let y = self.alloc(a.shape.clone())?;
        let n = y.len() as i64;
        let (aa, ba, ya) = (self.addr(a), self.addr(b), self.addr(&y));
        let mut l = self.gpu.stream().launch_builder(&self.k.add);
        l.arg(&aa).arg(&ba).arg(&ya).arg(&n);
        // SAFETY: arguments match `add`.
        unsafe { l.launch(cfg1d(y.len())) }.map_err(launched("add"))?;
        Ok(y)
    }

    fn max_pool_same(&self, x: &GpuTensor, kernel: usize, stride: usize) -> Result<GpuTensor> {
        let [n, c, h, w] = x.dims4("max_pool_same")?;
        if kernel == 0 || stride == 0 {
            return Err(Error::InvalidArgument(format!(
                "max pool kernel {kernel} and stride {stride} must be positive"
            )));
        }
        let pad = crate::compute::Padding::Same;
        let (oh, pt, _) = pad.resolve(h, kernel, stride, true);
        let (ow, pl, _) = pad.resolve(w, kernel, stride, false);
        let y = self.alloc(vec![n, c, oh, ow])?;
        let planes = (n * c) as i64;
        let dims = [h, w, oh, ow, kernel, stride, pt, pl].map(|v| v as i32);
        let (xa, ya) = (self.addr(x), self.addr(&y));
        let mut l = self.gpu.stream().launch_builder(&self.k.max_pool_same);
        l.arg(&xa).arg(&ya).arg(&planes);
        for d in &dims {
            l.arg(d);
        }
        // SAFETY: arguments match `max_pool_same` (two pointers, planes, 8 ints).
        unsafe { l.launch(cfg1d(y.len())) }.map_err(launched("max_pool_same"))?;
        Ok(y)
    }

    fn upsample_nearest(&self, x: &GpuTensor, height: usize, width: usize) -> Result<GpuTensor> {
        let [n, c, h, w] = x.dims4("upsample_nearest")?;
        let y = self.alloc(vec![n, c, height, width])?;
        let planes = (n * c) as i64;
        let dims = [h, w, height, width].map(|v| v as i32);
        let (xa, ya) = (self.addr(x), self.addr(&y));
        let mut l = self.gpu.stream().launch_builder(&self.k.upsample_nearest);
        l.arg(&xa).arg(&ya).arg(&planes);
        for d in &dims {
            l.arg(d);
        }
        // SAFETY: arguments match `upsample_nearest`.
        unsafe { l.launch(cfg1d(y.len())) }.map_err(launched("upsample_nearest"))?;
        Ok(y)
    }

    fn weighted_sum(
        &self,
        xs: &[&GpuTensor],
        weights: &[f32],
        act: Activation,
    ) -> Result<GpuTensor> {
        if !(2..=3).contains(&xs.len()) || weights.len() != xs.len() {
            return Err(Error::InvalidArgument(format!(
                "weighted_sum on the GPU fuses 2 or 3 inputs with one weight each, got {} \
                 inputs and {} weights",
                xs.len(),
                weights.len()
            )));
        }
        for x in &xs[1..] {
            same_shape("weighted_sum", xs[0], x)?;
        }
        let y = self.alloc(xs[0].shape.clone())?;
        let ptrs = [
            self.addr(xs[0]),
            self.addr(xs[1]),
            self.opt_addr(xs.get(2).copied()),
        ];
        let w = [
            weights[0],
            weights[1],
            weights.get(2).copied().unwrap_or(0.0),
        ];
        let (ya, n, a) = (self.addr(&y), y.len() as i64, activation_code(act));
        let mut l = self.gpu.stream().launch_builder(&self.k.weighted_sum);
        l.arg(&ptrs[0]).arg(&ptrs[1]).arg(&ptrs[2]);
        l.arg(&w[0]).arg(&w[1]).arg(&w[2]).arg(&ya).arg(&n).arg(&a);
        // SAFETY: arguments match `weighted_sum`.
        unsafe { l.launch(cfg1d(y.len())) }.map_err(launched("weighted_sum"))?;
        Ok(y)
    }
}
