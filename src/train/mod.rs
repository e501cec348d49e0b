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

pub mod coco;
pub mod dist;
pub mod ema;
pub mod labeler;
pub mod loss;
pub mod model;
pub mod optim;
pub mod schedule;
pub mod tape;
