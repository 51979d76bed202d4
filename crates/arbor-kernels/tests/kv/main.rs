//! Tests of the paged KV cache (`arbor_kernels::kv`): property tests that drive it with random
//! operations beside a naive model, and targeted tests of copy-on-write, prefix reuse, LRU
//! eviction, usage accounting and `KvFull`. One test binary.

/// Fails the proptest case with a formatted message unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::model::fail(format!($($fmt)+)));
        }
    };
}

mod apply;
mod common;
mod lru;
mod model;
mod ops;
mod props;
mod targeted;
