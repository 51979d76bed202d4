//! Every op the model runs, one file each. Each is the CPU reference (f32 math, rayon where it
//! pays); CUDA launches sit beside them behind the `cuda` feature.

pub mod attention;
pub mod cascade;
pub mod embedding;
pub mod matmul;
pub mod moe;
pub mod norm;
mod online;
pub mod rope;
pub mod sample;
pub mod softmax;
pub mod swiglu;

pub use attention::{paged_attention, AttentionParams};
pub use embedding::embedding;
pub use matmul::matmul;
pub use moe::{
    group_by_expert, moe_experts, route_given, route_softmax_topk, routing_regret, ExpertFfn,
    ExpertGroups, Routing,
};
pub use norm::{add_rms_norm, rms_norm, rms_norm_rows};
pub use rope::{RopeLayout, RopeScaling, RopeTable};
pub use sample::{
    apply_sampling_penalties, sample, sample_batch, sample_uniform, sampling_candidates,
    SampleOutput, SamplingParams,
};
pub use softmax::{log_softmax, softmax_inplace};
pub use swiglu::swiglu;
