//! The CUDA backend's tests, one binary:
//! - `compile`: every kernel file compiles with NVRTC for every target architecture (runs
//!   wherever NVRTC is found, GPU or not; CI installs it from PyPI);
//! - the op modules: every GPU op against its CPU reference on random inputs (need a GPU;
//!   skipped with a printed reason without one);
//! - `emulator`: attention, cascade and MoE kernels run on a CPU emulator against numpy
//!   (needs g++ and numpy, no GPU).
#![cfg(feature = "cuda")]

mod common;
mod compile;
mod emulator;
mod gemm;
mod ops_attention;
mod ops_attention_batch;
mod ops_cascade;
mod ops_common;
mod ops_elementwise;
mod ops_kv;
mod ops_moe;
mod ops_qkv;
mod sample;
