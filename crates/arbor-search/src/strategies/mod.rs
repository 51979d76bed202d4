//! Every search strategy, and [`build`] to make one by name.

pub mod stepwise;
