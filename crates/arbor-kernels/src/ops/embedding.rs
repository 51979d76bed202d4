//! Token embedding gather.

use crate::{KernelError, Weight};

/// Writes the embedding row of each token into `out` (`tokens.len() × table.cols`).
pub fn embedding(table: &Weight, tokens: &[u32], out: &mut [f32]) -> Result<(), KernelError> {
    let d = table.cols;
    if out.len() != tokens.len() * d {
        return Err(KernelError::Shape { op: "embedding", detail: format!("{} tokens into {}", tokens.len(), out.len()) });
    }
    for (t, row) in tokens.iter().zip(out.chunks_mut(d)) {
        if *t as usize >= table.rows {
            return Err(KernelError::Invalid(format!("token id {t} is outside the vocabulary of {}", table.rows)));
        }
        table.row_to_f32(*t as usize, row)?;
    }
    Ok(())
}
