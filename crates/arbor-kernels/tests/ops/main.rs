//! Tests of the CPU reference ops against independent (mostly f64) references: one test
//! binary, one module per op family.

mod attention;
mod common;
mod elementwise;
mod rope;
mod sample;
mod timing;
