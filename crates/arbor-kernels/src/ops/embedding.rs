//! Token embedding gather.

use crate::{KernelError, Weight};

/// Writes the embedding row of each token into `out` (`tokens.len() × table.cols`), converting
/// the table's stored format (f32, f16, bf16 or quantised blocks) to f32. Every token is
/// checked before anything is written, so on `Err` `out` is untouched.
pub fn embedding(table: &Weight, tokens: &[u32], out: &mut [f32]) -> Result<(), KernelError> {
    let d = table.cols;
    if Some(out.len()) != tokens.len().checked_mul(d) {
        return Err(KernelError::Shape {
            op: "embedding",
            detail: format!("{} tokens of {d} values into {}", tokens.len(), out.len()),
        });
    }
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= table.rows) {
        return Err(KernelError::Invalid(format!(
            "token id {t} is outside the vocabulary of {}",
            table.rows
        )));
    }
    if d == 0 {
        return Ok(());
    }
    for (&t, row) in tokens.iter().zip(out.chunks_mut(d)) {
        table.row_to_f32(t as usize, row)?;
    }
    Ok(())
}
