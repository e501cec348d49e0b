//! Host side of the GPU pre-processing kernel (`kernels/preprocess.cu`): frames go through one
//! pinned staging buffer to the device asynchronously, then one launch letterboxes and
//! normalises the whole batch into the FP16 network input.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};

use super::device::{GpuContext, driver_error};
use super::kernels::PREPROCESS;
use super::params::{PreprocessImage, TapAddresses};
use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::preprocess::{FILL_RGB, Letterbox, ResizePlan, normalisation_table};

/// A resize plan with its taps on the device (one per frame size, kept for the stream's life).
struct DevicePlan {
    plan: ResizePlan,
    taps: [CudaSlice<i32>; 6],
}

/// Bytes of plane `p` the kernel may read: up to the end of the last row.
fn plane_bytes(frame: &Frame, p: usize) -> usize {
    let (row_bytes, rows) = frame
        .format()
        .plane_extent(p, frame.width(), frame.height());
    if rows == 0 {
        return 0;
    }
    (rows - 1) * frame.stride(p) + row_bytes
}

struct Staging {
    host: Option<PinnedHostSlice<u8>>,
    device: Option<CudaSlice<u8>>,
    images: Option<CudaSlice<PreprocessImage>>,
}

/// GPU letterbox + normalisation into `[N, 3, S, S]` FP16 (as `u16` bits).
pub struct GpuPreprocessor {
    gpu: Arc<GpuContext>,
    func: CudaFunction,
    lut: CudaSlice<f32>,
    fill: CudaSlice<i32>,
    input_size: usize,
    plans: Mutex<HashMap<(usize, usize), Arc<DevicePlan>>>,
    staging: Mutex<Staging>,
}

impl GpuPreprocessor {
    /// Compiles (or loads) the kernel and uploads the normalisation table.
    pub fn new(gpu: Arc<GpuContext>, input_size: usize) -> Result<Self> {
        if input_size == 0 {
            return Err(Error::InvalidArgument(
                "network input size must be at least 1".into(),
            ));
        }
        let func = gpu.function(&PREPROCESS, "preprocess_letterbox")?;
        let s = gpu.stream();
        let lut = s
            .clone_htod(&normalisation_table()[..])
            .map_err(|e| driver_error("upload normalisation table", e))?;
        let fill = s
            .clone_htod(&FILL_RGB.map(i32::from)[..])
            .map_err(|e| driver_error("upload fill colour", e))?;
        Ok(GpuPreprocessor {
            gpu,
            func,
            lut,
            fill,
            input_size,
            plans: Mutex::new(HashMap::new()),
            staging: Mutex::new(Staging {
                host: None,
                device: None,
                images: None,
            }),
        })
    }

    fn plan(&self, width: usize, height: usize) -> Result<Arc<DevicePlan>> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = plans.get(&(width, height)) {
            return Ok(p.clone());
        }
        let plan = ResizePlan::new(width, height, self.input_size)?;
        let s = self.gpu.stream();
        let up = |v: &[i32]| {
            s.clone_htod(v)
                .map_err(|e| driver_error("upload resize taps", e))
        };
        let (h, v) = (&plan.horizontal, &plan.vertical);
        let taps = [
            up(&h.start)?,
            up(&h.len)?,
            up(&h.k)?,
            up(&v.start)?,
            up(&v.len)?,
            up(&v.k)?,
        ];
        let p = Arc::new(DevicePlan { plan, taps });
        plans.insert((width, height), p.clone());
        Ok(p)
    }

    /// Pre-processes `frames` into `out` (`frames.len() * 3 * S * S` FP16 values). Work is
    /// queued on the detector's stream; the frames' bytes are copied into pinned memory before
    /// this returns, so the caller may release them.
    pub fn run(&self, frames: &[Frame], out: &mut CudaSlice<u16>) -> Result<Vec<Letterbox>> {
        let s = self.input_size;
        let need = frames.len() * 3 * s * s;
        if out.len() < need {
            return Err(Error::InvalidArgument(format!(
                "GPU input buffer holds {} values, {} frames need {need}",
                out.len(),
                frames.len()
            )));
        }
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let stream = self.gpu.stream();
        let plans: Vec<Arc<DevicePlan>> = frames
            .iter()
            .map(|f| self.plan(f.width(), f.height()))
            .collect::<Result<_>>()?;

        // Lay all planes of all frames out in one staging buffer (64-byte aligned starts).
        let mut offsets = Vec::with_capacity(frames.len());
        let mut total = 0usize;
        for f in frames {
            let mut o = [0usize; 3];
            for (p, slot) in o.iter_mut().enumerate().take(f.format().num_planes()) {
                *slot = total;
                total += plane_bytes(f, p).next_multiple_of(64);
            }
            offsets.push(o);
        }
        let mut st = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        if st.host.as_ref().is_none_or(|h| h.len() < total) {
            st.host = None;
            st.device = None;
            let cap = total.next_power_of_two();
            // SAFETY: the pinned buffer is fully written below before any copy reads it.
            st.host = Some(
                unsafe { self.gpu.context().alloc_pinned::<u8>(cap) }
                    .map_err(|e| driver_error("cuMemHostAlloc (frame staging)", e))?,
            );
            // SAFETY: the device buffer is only read where the copy below wrote it.
            st.device = Some(
                unsafe { stream.alloc::<u8>(cap) }
                    .map_err(|e| driver_error("cuMemAlloc (frame staging)", e))?,
            );
        }
        let Staging {
            host,
            device,
            images,
        } = &mut *st;
        let (Some(host), Some(device)) = (host.as_mut(), device.as_mut()) else {
            return Err(Error::Gpu {
                op: "frame staging".into(),
                reason: "staging buffers missing after allocation".into(),
            });
        };
        {
            let h = host
                .as_mut_slice()
                .map_err(|e| driver_error("pinned staging buffer", e))?;
            for (f, o) in frames.iter().zip(&offsets) {
                for (p, &start) in o.iter().enumerate().take(f.format().num_planes()) {
                    let n = plane_bytes(f, p);
                    h[start..start + n].copy_from_slice(&f.plane(p)[..n]);
                }
            }
        }
        stream
            .memcpy_htod(&*host, &mut device.slice_mut(..))
            .map_err(|e| driver_error("cuMemcpyHtoDAsync (frames)", e))?;

        let (base, _sync) = device.device_ptr(stream);
        let mut descs = Vec::with_capacity(frames.len());
        let mut boxes = Vec::with_capacity(frames.len());
        for ((f, o), plan) in frames.iter().zip(&offsets).zip(&plans) {
            let mut planes = [0u64; 3];
            for (p, addr) in planes.iter_mut().enumerate().take(f.format().num_planes()) {
                *addr = base + o[p] as u64;
            }
            let taps: TapAddresses = std::array::from_fn(|i| plan.taps[i].device_ptr(stream).0);
            descs.push(PreprocessImage::new(f, &plan.plan, planes, taps));
            boxes.push(plan.plan.letterbox);
        }
        if images.as_ref().is_none_or(|d| d.len() < descs.len()) {
            *images = Some(
                stream
                    .clone_htod(&descs)
                    .map_err(|e| driver_error("upload frame descriptors", e))?,
            );
        } else if let Some(d) = images.as_mut() {
            stream
                .memcpy_htod(&descs, &mut d.slice_mut(..descs.len()))
                .map_err(|e| driver_error("upload frame descriptors", e))?;
        }
        let Some(images) = images.as_ref() else {
            return Err(Error::Gpu {
                op: "frame descriptors".into(),
                reason: "descriptor buffer missing after upload".into(),
            });
        };
        let blocks = s.div_ceil(16) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, blocks, frames.len() as u32),
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        };
        let size = s as i32;
        let mut launch = stream.launch_builder(&self.func);
        launch
            .arg(images)
            .arg(&self.lut)
            .arg(&self.fill)
            .arg(&size)
            .arg(&mut *out);
        // SAFETY: argument types and order match `preprocess_letterbox`; every address in the
        // descriptors points into buffers that live until the stream is synchronised (the
        // staging buffers and plans are owned by `self`); `out` holds `need` values.
        unsafe { launch.launch(cfg) }
            .map_err(|e| driver_error("launch preprocess_letterbox", e))?;
        Ok(boxes)
    }
}
