//! The structures the kernels read, laid out exactly as their C definitions in
//! `src/compute/cuda/kernels/*.cu` (`#[repr(C)]`, same field order and types), and the host
//! code that fills them from a [`Frame`] and a [`ResizePlan`]. Device addresses are `u64`
//! (`CUdeviceptr`); the host-emulation tests put host addresses in the same fields.

use crate::frame::{Frame, PixelFormat};
use crate::preprocess::{ResizePlan, yuv_coefficients};

/// `EFFDET_FMT_*` in preprocess.cu.
pub fn format_code(format: PixelFormat) -> i32 {
    match format {
        PixelFormat::Rgb => 0,
        PixelFormat::Rgba | PixelFormat::Rgbx => 1,
        PixelFormat::Bgrx | PixelFormat::Bgra => 2,
        PixelFormat::Nv12 => 3,
        PixelFormat::I420 => 4,
    }
}

/// `struct PreprocessImage` in preprocess.cu: one frame of a pre-processing batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PreprocessImage {
    pub plane: [u64; 3],
    pub h_start: u64,
    pub h_len: u64,
    pub h_k: u64,
    pub v_start: u64,
    pub v_len: u64,
    pub v_k: u64,
    pub stride: [i32; 3],
    pub format: i32,
    pub width: i32,
    pub height: i32,
    pub resized_w: i32,
    pub resized_h: i32,
    pub h_ksize: i32,
    pub v_ksize: i32,
    pub vertical_first: i32,
    pub yuv: [i32; 6],
}

/// Addresses of a plan's six tap arrays, in the order
/// `[h_start, h_len, h_k, v_start, v_len, v_k]`.
pub type TapAddresses = [u64; 6];

impl PreprocessImage {
    /// Describes `frame` (planes at `planes`, its own strides) resized by `plan`, whose tap
    /// arrays live at `taps`.
    pub fn new(frame: &Frame, plan: &ResizePlan, planes: [u64; 3], taps: TapAddresses) -> Self {
        let mut stride = [0i32; 3];
        for (p, s) in stride
            .iter_mut()
            .enumerate()
            .take(frame.format().num_planes())
        {
            // Frame strides are validated against the plane data, far below 2^31 for video.
            *s = frame.stride(p) as i32;
        }
        let lb = &plan.letterbox;
        PreprocessImage {
            plane: planes,
            h_start: taps[0],
            h_len: taps[1],
            h_k: taps[2],
            v_start: taps[3],
            v_len: taps[4],
            v_k: taps[5],
            stride,
            format: format_code(frame.format()),
            width: frame.width() as i32,
            height: frame.height() as i32,
            resized_w: lb.resized_width as i32,
            resized_h: lb.resized_height as i32,
            h_ksize: plan.horizontal.ksize as i32,
            v_ksize: plan.vertical.ksize as i32,
            vertical_first: i32::from(plan.vertical_first),
            yuv: yuv_coefficients(frame.matrix(), frame.range()),
        }
    }
}

/// `struct TopkState` in postprocess.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TopkState {
    pub prefix: u64,
    pub need: u32,
    pub count: u32,
}

/// `struct DecodeImage` in postprocess.cu: clip limits and scale of one image.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecodeImage {
    pub clip_w: f32,
    pub clip_h: f32,
    pub img_scale: f32,
    pub pad: f32,
}

impl DecodeImage {
    /// From effdet's image info (clip limits computed in f32 exactly as the CPU does).
    pub fn new(info: &crate::postprocess::ImageInfo) -> Self {
        let (clip_w, clip_h) = info.clip_size();
        DecodeImage {
            clip_w,
            clip_h,
            img_scale: info.img_scale,
            pad: 0.0,
        }
    }
}

/// `struct GpuDetection` in postprocess.cu: one final detection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GpuDetection {
    pub bbox: [f32; 4],
    pub score: f32,
    pub class_id: u32,
}

#[cfg(feature = "cuda")]
mod device_repr {
    // SAFETY: plain #[repr(C)] data of integers and floats, valid for any bit pattern the
    // kernels write, with the C layout the kernels expect.
    unsafe impl cudarc::driver::DeviceRepr for super::PreprocessImage {}
    unsafe impl cudarc::driver::DeviceRepr for super::TopkState {}
    unsafe impl cudarc::driver::ValidAsZeroBits for super::TopkState {}
    unsafe impl cudarc::driver::DeviceRepr for super::DecodeImage {}
    unsafe impl cudarc::driver::DeviceRepr for super::GpuDetection {}
    unsafe impl cudarc::driver::ValidAsZeroBits for super::GpuDetection {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C layouts: offsets as the C compiler assigns them (checked in the emulation test
    /// too, by `sizeof` from the C side).
    #[test]
    fn sizes_match_the_c_structs() {
        // 9 addresses, 17 ints, padded to a multiple of 8.
        assert_eq!(std::mem::size_of::<PreprocessImage>(), 144);
        assert_eq!(std::mem::size_of::<TopkState>(), 16);
        assert_eq!(std::mem::size_of::<DecodeImage>(), 16);
        assert_eq!(std::mem::size_of::<GpuDetection>(), 24);
    }
}

/// `struct ConvParams` in conv.cu: the shapes of one convolution (passed by value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvParams {
    pub n: i32,
    pub cin: i32,
    pub h: i32,
    pub w: i32,
    pub cout: i32,
    pub kh: i32,
    pub kw: i32,
    pub oh: i32,
    pub ow: i32,
    pub stride: i32,
    pub groups: i32,
    pub pad_top: i32,
    pub pad_left: i32,
    pub act: i32,
}

impl ConvParams {
    /// The launch parameters of a convolution of an `[n, cin, h, w]` input with an
    /// `[cout, cin / groups, kh, kw]` weight, output size and padding resolved from `spec`.
    /// Errors ([`Error::Shape`]) when the shapes do not fit the groups or the stride is 0.
    pub fn new(
        input: [usize; 4],
        weight: [usize; 4],
        spec: crate::compute::ConvSpec,
    ) -> crate::error::Result<ConvParams> {
        let [n, cin, h, w] = input;
        let [cout, cin_g, kh, kw] = weight;
        let groups = spec.groups.max(1);
        if cin_g * groups != cin || cout % groups != 0 || spec.stride == 0 {
            return Err(crate::error::Error::Shape {
                op: "conv2d",
                detail: format!(
                    "input {input:?}, weight {weight:?}, groups {groups}, stride {}",
                    spec.stride
                ),
            });
        }
        let (oh, pad_top, _) = spec.padding.resolve(h, kh, spec.stride, true);
        let (ow, pad_left, _) = spec.padding.resolve(w, kw, spec.stride, false);
        let i = |v: usize| v as i32;
        Ok(ConvParams {
            n: i(n),
            cin: i(cin),
            h: i(h),
            w: i(w),
            cout: i(cout),
            kh: i(kh),
            kw: i(kw),
            oh: i(oh),
            ow: i(ow),
            stride: i(spec.stride),
            groups: i(groups),
            pad_top: i(pad_top),
            pad_left: i(pad_left),
            act: activation_code(spec.act),
        })
    }
}

/// `EFFDET_ACT_*` in the kernels.
pub fn activation_code(act: crate::compute::Activation) -> i32 {
    use crate::compute::Activation::*;
    match act {
        None => 0,
        Swish => 1,
        Sigmoid => 2,
        Relu => 3,
    }
}

#[cfg(feature = "cuda")]
// SAFETY: #[repr(C)] integers, the layout conv.cu declares.
unsafe impl cudarc::driver::DeviceRepr for ConvParams {}
