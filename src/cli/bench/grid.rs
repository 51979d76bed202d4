//! The workload grid: strategy × width × prompt length × generation length × sharing, and
//! the strategy parameters that give each cell a fixed generation length.

use anyhow::{bail, Context};
use arbor_search::Params;

/// Strategies `arbor bench` runs (those whose work a width and a length describe).
pub const STRATEGIES: &[&str] = &["sampling", "best-of-n", "beam", "step-beam", "mcts"];

/// A step delimiter no text contains, so that steps end at `step_tokens` and every branch
/// generates a fixed number of tokens.
const NO_DELIMITER: &str = "<arbor-bench: steps end at step_tokens>";

/// Steps of the step-level strategies (step-beam, mcts) per branch.
pub const STEPS: usize = 4;

/// One cell of the grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub strategy: String,
    pub width: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub sharing: bool,
}

impl Cell {
    /// The strategy parameters: `max_tokens = gen_len` for sample and token-beam strategies;
    /// [`STEPS`] steps of `ceil(gen_len / STEPS)` tokens for step strategies.
    pub fn params(&self) -> anyhow::Result<Params> {
        let p = Params::new(self.width);
        let p = match self.strategy.as_str() {
            "sampling" | "best-of-n" | "beam" => p.set("max_tokens", self.gen_len),
            "step-beam" | "mcts" => p
                .set("delimiter", NO_DELIMITER)
                .set("step_tokens", self.gen_len.div_ceil(STEPS))
                .set("max_steps", STEPS),
            other => bail!(
                "strategy '{other}' is not benchmarked: use {}",
                STRATEGIES.join(", ")
            ),
        };
        Ok(p)
    }

    /// True for strategies that need a verifier (the policy as LM judge).
    pub fn needs_verifier(&self) -> bool {
        matches!(self.strategy.as_str(), "best-of-n" | "step-beam" | "mcts")
    }

    /// "on" or "off".
    pub fn sharing_str(&self) -> &'static str {
        if self.sharing {
            "on"
        } else {
            "off"
        }
    }
}

/// Parses a comma-separated list of positive integers.
pub fn numbers(flag: &str, list: &str) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let n: usize = part
            .parse()
            .with_context(|| format!("{flag}: '{part}' is not a whole number"))?;
        if n == 0 {
            bail!("{flag}: values must be at least 1");
        }
        out.push(n);
    }
    if out.is_empty() {
        bail!("{flag} needs at least one value");
    }
    Ok(out)
}

/// Parses `on,off`.
pub fn sharing(list: &str) -> anyhow::Result<Vec<bool>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        out.push(match part {
            "on" => true,
            "off" => false,
            other => bail!("--sharing: '{other}' is neither on nor off"),
        });
    }
    if out.is_empty() {
        bail!("--sharing needs on, off or on,off");
    }
    Ok(out)
}

/// Parses and checks the strategy list.
pub fn strategies(list: &str) -> anyhow::Result<Vec<String>> {
    let out: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if out.is_empty() {
        bail!("--strategy needs at least one of {}", STRATEGIES.join(", "));
    }
    for s in &out {
        if !STRATEGIES.contains(&s.as_str()) {
            bail!(
                "--strategy: '{s}' is not benchmarked: use {}",
                STRATEGIES.join(", ")
            );
        }
    }
    Ok(out)
}

/// Every cell, strategy-major, sharing innermost (so on/off of one shape run side by side).
pub fn cells(
    strategies: &[String],
    widths: &[usize],
    prompts: &[usize],
    gens: &[usize],
    sharing: &[bool],
) -> Vec<Cell> {
    let mut out = Vec::new();
    for s in strategies {
        for &prompt_len in prompts {
            for &gen_len in gens {
                for &width in widths {
                    for &sh in sharing {
                        out.push(Cell {
                            strategy: s.clone(),
                            width,
                            prompt_len,
                            gen_len,
                            sharing: sh,
                        });
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_builds_every_strategy() {
        assert_eq!(numbers("--width", "1, 4,16").unwrap(), vec![1, 4, 16]);
        assert!(numbers("--width", "0").is_err());
        assert!(numbers("--width", "x").is_err());
        assert_eq!(sharing("on,off").unwrap(), vec![true, false]);
        assert!(sharing("maybe").is_err());
        assert!(strategies("beam,vote").is_err());
        let s = strategies(&STRATEGIES.join(",")).unwrap();
        let grid = cells(&s, &[1, 4], &[16], &[8], &[true, false]);
        assert_eq!(grid.len(), STRATEGIES.len() * 4);
        for c in grid {
            let p = c.params().unwrap();
            arbor_search::strategies::build(&c.strategy, &p).unwrap();
        }
    }
}
