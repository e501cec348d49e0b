//! Training: effdet's anchor labeling (ground-truth boxes -> per-anchor class and box targets,
//! [`labeler`]) and its detection loss with the analytic gradient of the loss with respect to
//! every raw head output ([`loss`]), the starting point of the backward pass; the optimizers,
//! gradient clipping and loss scaling ([`optim`]), the learning-rate schedule ([`schedule`]), the
//! weight EMA ([`ema`]), the data-parallel communicator seam ([`dist`]) and reverse-mode
//! automatic differentiation over the CPU engine ([`tape`]).
//! The per-op backward kernels live in [`crate::compute::cpu::backward`].
//!
//! Both reproduce effdet 0.4.1 (`effdet/anchors.py` `AnchorLabeler`, `effdet/object_detection/`,
//! `effdet/loss.py` `DetectionLoss`) as `DetBenchTrain` calls them:
//!
//! ```text
//! gt boxes (yxyx, network pixels) + 1-based classes
//!   -> AnchorLabeler::label          per image: LevelTargets (class [H, W, A], box [H, W, A*4])
//! raw head outputs per level (class [N, A*K, H, W], box [N, A*4, H, W]) + targets
//!   -> detection_loss                LossOutput: loss, class_loss, box_loss, d loss / d outputs
//! ```

pub mod checkpoint;
pub mod coco;
pub mod dataset;
pub mod dist;
pub mod ema;
pub mod labeler;
pub mod loader;
pub mod loss;
pub mod model;
pub mod optim;
pub mod schedule;
pub mod tape;
pub mod trainer;

/// Keeps freed tensor memory in the process instead of returning it to the kernel. A training
/// step allocates and frees hundreds of activation and gradient buffers of up to ~50 MB; glibc
/// serves those with fresh `mmap`s, so every step paid page faults on first touch plus TLB
/// shootdowns on `munmap` across threads (about a third of the step's time in `perf`). With
/// `mmap` off for malloc and trimming disabled, freed buffers are reused from the heap.
///
/// Process-wide, so the library never calls it itself: training programs call it once at
/// start (`effdet loss`, `effdet bench-train` do). A no-op outside glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's <malloc.h>; the M_* values are part of its ABI.
        unsafe extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_MAX: std::ffi::c_int = -4;
        // SAFETY: mallopt only changes allocator tuning; called before the step allocates.
        unsafe {
            mallopt(M_MMAP_MAX, 0);
            mallopt(M_TRIM_THRESHOLD, std::ffi::c_int::MAX);
        }
    }
}
