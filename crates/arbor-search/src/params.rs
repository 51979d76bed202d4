//! Strategy parameters: a width plus named values (`--param name=value` on the command line,
//! a JSON object over HTTP), read with typed getters that name the parameter in their errors.

use std::collections::BTreeMap;

/// Parameters of one search.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params {
    /// Branches, beams or samples, depending on the strategy.
    pub width: usize,
    values: BTreeMap<String, String>,
}

impl Params {
    /// `width` and no named values.
    pub fn new(width: usize) -> Self {
        Params {
            width,
            values: BTreeMap::new(),
        }
    }

    /// Adds `name=value`.
    pub fn set(mut self, name: &str, value: impl ToString) -> Self {
        self.values.insert(name.to_string(), value.to_string());
        self
    }

    /// Parses `name=value` items.
    pub fn parse(width: usize, items: &[String]) -> Result<Self, String> {
        let mut p = Params::new(width);
        for it in items {
            let (k, v) = it
                .split_once('=')
                .ok_or_else(|| format!("parameter '{it}' is not of the form name=value"))?;
            p.values.insert(k.trim().to_string(), v.trim().to_string());
        }
        Ok(p)
    }

    /// A number parameter, or `default` when absent.
    pub fn f64(&self, name: &str, default: f64) -> Result<f64, String> {
        self.get(name, default)
    }

    /// A count parameter, or `default` when absent.
    pub fn usize(&self, name: &str, default: usize) -> Result<usize, String> {
        self.get(name, default)
    }

    /// A text parameter (escapes `\n` and `\t` decoded), or `default` when absent.
    pub fn string(&self, name: &str, default: &str) -> String {
        self.values
            .get(name)
            .map_or(default, String::as_str)
            .replace("\\n", "\n")
            .replace("\\t", "\t")
    }

    /// A yes/no parameter (true/false/1/0), or `default`.
    pub fn bool(&self, name: &str, default: bool) -> Result<bool, String> {
        match self.values.get(name).map(String::as_str) {
            None => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(v) => Err(format!("parameter {name}={v} must be true or false")),
        }
    }

    /// Names given but not in `known`: strategies reject them so that typos do not pass
    /// silently.
    pub fn check_known(&self, known: &[&str]) -> Result<(), String> {
        match self.values.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(format!(
                "unknown parameter '{k}'; this strategy takes: {}",
                known.join(", ")
            )),
            None => Ok(()),
        }
    }

    fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.values.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("parameter {name}={v} is not a valid number")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_reports_bad_values() {
        let p = Params::parse(4, &["alpha=0.5".into(), "delim=\\n\\n".into()]).unwrap();
        assert_eq!(p.f64("alpha", 1.0), Ok(0.5));
        assert_eq!(p.usize("depth", 3), Ok(3));
        assert_eq!(p.string("delim", ""), "\n\n");
        assert!(Params::parse(1, &["oops".into()]).is_err());
        assert!(p.usize("alpha", 1).is_err());
        assert!(p.check_known(&["alpha"]).is_err());
        assert!(p.check_known(&["alpha", "delim"]).is_ok());
    }
}
