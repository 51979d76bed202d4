//! Verifiers described as text, as `arbor search --verifier` and the server's `/v1/search`
//! take them: `judge`, `command:CMD`, `code[:PYTHON]`, `rule`, `regex:PATTERN`, and the
//! verifier models `orm:PATH`, `prm:PATH` and `judge:PATH` (see [`load_model`]).

use crate::scheduler::{Scoring, VerifierModel};
use crate::verifier::{CodeVerifier, CommandVerifier, Judge, RuleVerifier, Verifier};
use arbor_runtime::{Engine, EngineOptions, RewardKind};
use std::path::Path;
use std::time::Duration;

/// How a verifier spec may be turned into a verifier.
#[derive(Clone, Debug)]
pub struct VerifierOptions {
    /// Seconds an external command or a code candidate may take.
    pub command_timeout: Duration,
    /// Whether `command:CMD` and `code[:PYTHON]` are allowed (they run programs on this
    /// machine; a server keeps them off unless its operator turns them on).
    pub allow_command: bool,
    /// Verifier models loaded into the scheduler: `(spec, lane)`.
    pub models: Vec<(String, usize)>,
}

impl Default for VerifierOptions {
    fn default() -> Self {
        VerifierOptions {
            command_timeout: Duration::from_secs(10),
            allow_command: true,
            models: Vec::new(),
        }
    }
}

/// Whether `spec` names a verifier model (`orm:PATH`, `prm:PATH`, `judge:PATH`), which must
/// be loaded with [`load_model`] before searches can use it.
pub fn is_model(spec: &str) -> bool {
    matches!(spec.split_once(':'), Some(("orm" | "prm" | "judge", p)) if !p.is_empty())
}

/// Loads the verifier model `spec` names, with a KV pool of `kv_bytes`:
/// - `orm:PATH`: an outcome reward model (`*ForSequenceClassification`, HF directory);
/// - `prm:PATH`: a process reward model (`*ForTokenClassification`); it scores a
///   candidate's last step at the step separator `\n\n` (the stepwise strategies' default
///   delimiter);
/// - `judge:PATH`: any causal LM as LM-as-judge (GGUF or HF directory).
///
/// The model runs on `device` (the policy's, so both step in the same tick on one GPU).
pub fn load_model(
    spec: &str,
    kv_bytes: usize,
    page_size: usize,
    device: arbor_kernels::Device,
) -> Result<VerifierModel, String> {
    let Some((kind, path)) = spec.split_once(':').filter(|_| is_model(spec)) else {
        return Err(format!(
            "'{spec}' is not a verifier model: use orm:PATH, prm:PATH or judge:PATH"
        ));
    };
    let fail = |e: arbor_runtime::RuntimeError| format!("verifier model {spec}: {e}");
    let loaded = arbor_runtime::load(Path::new(path)).map_err(fail)?;
    let head = loaded.model.cfg.reward.clone();
    let scoring = match (kind, head) {
        ("judge", None) => Scoring::Judge(Judge::default()),
        ("orm", Some(h)) if h.kind == RewardKind::Outcome => Scoring::Reward {
            head: h,
            separator: String::new(),
        },
        ("prm", Some(h)) if h.kind == RewardKind::Process => Scoring::Reward {
            head: h,
            separator: "\n\n".into(),
        },
        (_, h) => {
            let what = h.map_or("a causal LM".to_string(), |h| h.architecture);
            return Err(format!(
                "verifier model {spec}: the model is {what}; orm: needs a *ForSequenceClassification, \
                 prm: a *ForTokenClassification and judge: a causal LM"
            ));
        }
    };
    let engine = Engine::on_device(
        loaded.model,
        &EngineOptions {
            kv_cache_bytes: kv_bytes,
            page_size,
        },
        device,
    )
    .map_err(fail)?;
    Ok(VerifierModel::new(
        spec.to_string(),
        engine,
        loaded.tokenizer,
        scoring,
    ))
}

/// The verifier `spec` names: `judge` (the policy as LM-as-judge), `command:CMD` (stdin JSON
/// {question, answer} → a number on stdout), `code[:PYTHON]` (runs each candidate program on
/// the prompt's worked examples; see [`CodeVerifier`]), `rule` (the extracted answer equals
/// `expected`) or `regex:PATTERN` (1 if the candidate matches).
pub fn verifier(
    spec: &str,
    expected: Option<&str>,
    opts: &VerifierOptions,
) -> Result<Verifier, String> {
    if let Some((name, lane)) = opts.models.iter().find(|(m, _)| m == spec) {
        return Ok(Verifier::Model {
            lane: *lane,
            name: name.clone(),
        });
    }
    if is_model(spec) {
        return Err(format!("verifier model '{spec}' is not loaded here"));
    }
    Ok(
        match spec.split_once(':').map_or((spec, ""), |(k, v)| (k, v)) {
            ("judge", "") => Verifier::Judge(Judge::default()),
            ("command", cmd) if !cmd.is_empty() => {
                if !opts.allow_command {
                    return Err(
                        "command verifiers run shell commands and are turned off here".into(),
                    );
                }
                Verifier::Text(Box::new(CommandVerifier {
                    command: cmd.to_string(),
                    timeout: opts.command_timeout,
                }))
            }
            ("code", python) => {
                if !opts.allow_command {
                    return Err("code verifiers run candidate programs and are turned off here".into());
                }
                let mut v = CodeVerifier::new(if python.is_empty() { "python3" } else { python });
                v.timeout = opts.command_timeout;
                Verifier::Text(Box::new(v))
            }
            ("rule", _) => {
                let Some(expected) = expected else {
                    return Err("the rule verifier needs the expected answer".into());
                };
                Verifier::Text(Box::new(RuleVerifier::expected(expected)))
            }
            ("regex", pat) if !pat.is_empty() => {
                Verifier::Text(Box::new(RuleVerifier::regex(pat)?))
            }
            _ => {
                return Err(format!(
                    "unknown verifier '{spec}': use judge, command:CMD, code[:PYTHON], rule, regex:PATTERN, orm:PATH, prm:PATH or judge:PATH"
                ))
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_errors_name_the_problem() {
        let o = VerifierOptions::default();
        assert_eq!(verifier("judge", None, &o).unwrap().name(), "judge:policy");
        assert_eq!(verifier("regex:a+", None, &o).unwrap().name(), "regex:a+");
        let err =
            |spec: &str, o: &VerifierOptions| verifier(spec, None, o).err().unwrap_or_default();
        assert!(err("rule", &o).contains("expected"));
        assert!(err("nope", &o).contains("unknown verifier"));
        let off = VerifierOptions {
            allow_command: false,
            ..o.clone()
        };
        assert!(err("command:true", &off).contains("turned off"));
        assert!(err("code", &off).contains("turned off"));
        assert!(verifier("code", None, &o).is_ok());
        assert!(err("orm:/x", &o).contains("not loaded"));
        let with = VerifierOptions {
            models: vec![("orm:/x".into(), 2)],
            ..VerifierOptions::default()
        };
        assert_eq!(verifier("orm:/x", None, &with).unwrap().name(), "orm:/x");
        assert!(is_model("judge:m.gguf") && !is_model("judge") && !is_model("code:python3"));
    }

    #[test]
    fn verifier_models_load_by_kind() {
        let dir = |m: &str| {
            format!(
                "{}/../../tests/fixtures/models/{m}",
                env!("CARGO_MANIFEST_DIR")
            )
        };
        let orm = load_model(
            &format!("orm:{}", dir("reward-orm")),
            1 << 20,
            8,
            arbor_kernels::Device::Cpu,
        )
        .unwrap();
        assert!(orm.name.starts_with("orm:"));
        assert!(load_model(
            &format!("prm:{}", dir("reward-prm")),
            1 << 20,
            8,
            arbor_kernels::Device::Cpu
        )
        .is_ok());
        assert!(load_model(
            &format!("judge:{}", dir("llama")),
            1 << 20,
            8,
            arbor_kernels::Device::Cpu
        )
        .is_ok());
        let e = load_model(
            &format!("prm:{}", dir("reward-orm")),
            1 << 20,
            8,
            arbor_kernels::Device::Cpu,
        )
        .err()
        .unwrap();
        assert!(
            e.contains("Qwen2ForSequenceClassification") && e.contains("prm:"),
            "{e}"
        );
        let e = load_model(
            &format!("orm:{}", dir("llama")),
            1 << 20,
            8,
            arbor_kernels::Device::Cpu,
        )
        .err()
        .unwrap();
        assert!(e.contains("a causal LM"), "{e}");
        let e = load_model(
            "orm:/nonexistent/dir",
            1 << 20,
            8,
            arbor_kernels::Device::Cpu,
        )
        .err()
        .unwrap();
        assert!(e.contains("/nonexistent/dir"), "{e}");
    }
}
