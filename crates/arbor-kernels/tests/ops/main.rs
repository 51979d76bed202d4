//! Tests of the CPU reference ops against independent (mostly f64) references: one test
//! binary, one module per op family.

mod attention;
mod cascade;
mod cascade_sparse;
mod common;
mod elementwise;
mod kv_summary;
mod rope;
mod sample;
mod timing;
