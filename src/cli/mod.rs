//! The subcommands of the `effdet` binary, one file each.

pub mod bench;
pub mod bench_data;
pub mod bench_train;
pub mod common;
pub mod detect;
pub mod eval;
pub mod eval_model;
pub mod export;
pub mod loss;
pub mod synth;
pub mod train;
