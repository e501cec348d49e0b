//! [`Backend`] on the GPU: FP16 tensors in device memory (FP32 arithmetic inside every kernel),
//! one launch per op, everything queued on the detector's stream, so a forward pass never
//! waits for the host. The model code (`crate::model`) runs unchanged on it.
//!
//! Convolutions use the direct kernel (`conv.cu`) for now: correct for every shape the network
//! has (regular, strided, depthwise, SAME), and the reference for the faster cuDNN/cuBLAS paths
//! to come.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use half::f16;

use super::device::{GpuContext, driver_error};
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
    channel_affine: CudaFunction,
    activation: CudaFunction,
    add: CudaFunction,
    global_avg_pool: CudaFunction,
    scale_channels: CudaFunction,
    max_pool_same: CudaFunction,
    upsample_nearest: CudaFunction,
    weighted_sum: CudaFunction,
}

/// The CUDA engine's [`Backend`].
pub struct CudaBackend {
    gpu: Arc<GpuContext>,
    k: Kernels,
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
            channel_affine: e("channel_affine")?,
            activation: e("activation")?,
            add: e("add")?,
            global_avg_pool: e("global_avg_pool")?,
            scale_channels: e("scale_channels")?,
            max_pool_same: e("max_pool_same")?,
            upsample_nearest: e("upsample_nearest")?,
            weighted_sum: e("weighted_sum")?,
        };
        Ok(CudaBackend { gpu, k })
    }

    pub fn gpu(&self) -> &Arc<GpuContext> {
        &self.gpu
    }

    /// Device memory for `shape`, left unwritten: every kernel writes each output element.
    pub fn alloc(&self, shape: Vec<usize>) -> Result<GpuTensor> {
        let n: usize = shape.iter().product();
        // SAFETY: u16 has no invalid bit patterns; callers write every element before reading.
        let data = unsafe { self.gpu.stream().alloc::<u16>(n.max(1)) }
            .map_err(|e| driver_error(&format!("cuMemAlloc ({shape:?} FP16 tensor)"), e))?;
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
            .stream()
            .clone_dtoh(&t.data.slice(..t.len()))
            .map_err(|e| driver_error("cuMemcpyDtoH (download)", e))?;
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
        let (xa, wa, ba, ra, ya) = (
            self.addr(x),
            self.addr(weight),
            self.opt_addr(bias),
            self.opt_addr(residual),
            self.addr(&y),
        );
        let mut l = self.gpu.stream().launch_builder(&self.k.conv);
        l.arg(&xa).arg(&wa).arg(&ba).arg(&ra).arg(&ya).arg(&p);
        // SAFETY: arguments match `conv2d_direct` (five pointers, then ConvParams by value);
        // the addresses belong to tensors alive until the stream has run the launch (the
        // caller keeps inputs; `y` is returned).
        unsafe { l.launch(cfg1d(y.len())) }.map_err(launched("conv2d_direct"))?;
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
        // SAFETY: arguments match `global_avg_pool`.
        unsafe { l.launch(cfg1d(n * c)) }.map_err(launched("global_avg_pool"))?;
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
