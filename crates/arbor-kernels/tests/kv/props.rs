//! Random operation sequences against the naive model, checked after every operation.

use crate::model::{Coverage, Driver};
use crate::ops::{config, op, Config, Op};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};

fn run(c: Config, ops: &[Op]) -> Result<Coverage, TestCaseError> {
    let mut d = Driver::new(c);
    d.check()?;
    for op in ops {
        d.apply(op)?;
        d.check()?;
    }
    d.finish()?;
    Ok(d.cov)
}

fn case() -> impl Strategy<Value = (Config, Vec<Op>)> {
    (config(), prop::collection::vec(op(), 1..60))
}

/// 256 cases unless `PROPTEST_CASES` asks for more (a soak run); no regression files are
/// written (a failure prints its minimal case).
fn runner_config() -> RunnerConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(256);
    RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    }
}

proptest! {
    #![proptest_config(runner_config())]

    /// Any operation sequence keeps the bookkeeping consistent and every live sequence's
    /// tokens and K/V exactly the model's.
    #[test]
    fn random_operations_match_the_model((c, ops) in case()) {
        run(c, &ops)?;
    }
}

/// The random cases take every interesting path: reuse, copy-on-write, `KvFull`, eviction,
/// forks and resumed preemptions.
#[test]
fn random_operations_cover_every_path() {
    let mut runner = TestRunner::deterministic();
    let mut total = Coverage::default();
    for _ in 0..128 {
        let (c, ops) = case().new_tree(&mut runner).unwrap().current();
        let cov = run(c, &ops).unwrap_or_else(|e| panic!("{e}\n{c:?}\n{ops:?}"));
        total.steps += cov.steps;
        total.reused_pages += cov.reused_pages;
        total.kv_full += cov.kv_full;
        total.evicted += cov.evicted;
        total.copies += cov.copies;
        total.forks += cov.forks;
        total.preempt_resumes += cov.preempt_resumes;
    }
    eprintln!("coverage of 128 cases: {total:?}");
    let Coverage {
        steps,
        reused_pages,
        kv_full,
        evicted,
        copies,
        forks,
        preempt_resumes,
    } = total;
    for (what, n) in [
        ("steps", steps),
        ("reused pages", reused_pages),
        ("KvFull", kv_full),
        ("evicted pages", evicted),
        ("copy-on-write", copies),
        ("forks", forks),
        ("resumed preemptions", preempt_resumes),
    ] {
        assert!(n >= 20, "only {n} {what} in 128 cases: {total:?}");
    }
}
