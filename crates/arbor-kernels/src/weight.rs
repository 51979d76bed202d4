//! A weight matrix kept in its stored format. The CPU matmul reads quantised blocks directly
//! (activations are quantised to 8 bits per block), so a Q4_1 model reads ~4.5 bits per weight
//! per token instead of 32.

use crate::quant::GgmlType;
use crate::KernelError;

/// A `rows × cols` matrix, row-major; each row is `cols` elements of `ty`.
/// In a linear layer, `rows` is the output dimension and `cols` the input dimension
/// (y = x · Wᵀ), as GGUF and safetensors store them.
#[derive(Clone, Debug)]
pub struct Weight {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
}

/// Storage of a [`Weight`].
#[derive(Clone, Debug)]
pub enum WeightData {
    /// f32 elements.
    F32(Vec<f32>),
    /// Raw rows of a GGML type other than F32 (F16, BF16 or a block quant).
    Raw { ty: GgmlType, bytes: Vec<u8> },
    /// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K rows interleaved in groups of eight:
    /// the CPU matmul's fastest layout (see [`crate::quant::interleave`];
    /// `interleave::row_bytes` per row, ggml's except for Q4_K and Q5_K).
    Interleaved { ty: GgmlType, bytes: Vec<u8> },
    /// Matrices of the same width but different storage, stacked by rows and multiplied part
    /// by part (a Q4_K_M file's q, k and v projections, or gate and up, mix Q4_K and Q6_K).
    /// `rows` is the sum of the parts' rows.
    Stacked(Vec<Weight>),
}

impl Weight {
    /// An f32 weight; checks that `data` fills `rows × cols`.
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self, KernelError> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(KernelError::Shape {
                op: "Weight::from_f32",
                detail: format!("{rows}x{cols} does not hold {} values", data.len()),
            });
        }
        Ok(Weight {
            rows,
            cols,
            data: WeightData::F32(data),
        })
    }

    /// A weight stored as `ty`; checks the byte count. F32 bytes are converted to f32.
    pub fn from_raw(
        rows: usize,
        cols: usize,
        ty: GgmlType,
        bytes: Vec<u8>,
    ) -> Result<Self, KernelError> {
        let expected = ty.bytes_for(cols)?.checked_mul(rows).ok_or_else(|| {
            KernelError::Invalid(format!("weight of {rows}x{cols} {ty} overflows"))
        })?;
        if bytes.len() != expected {
            return Err(KernelError::DataSize {
                ty: ty.to_string(),
                got: bytes.len(),
                expected,
            });
        }
        if ty == GgmlType::F32 {
            let data = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            return Ok(Weight {
                rows,
                cols,
                data: WeightData::F32(data),
            });
        }
        Ok(Weight {
            rows,
            cols,
            data: WeightData::Raw { ty, bytes },
        })
    }

    /// The stored element type (of the first part, for stacked parts).
    pub fn ty(&self) -> GgmlType {
        match &self.data {
            WeightData::F32(_) => GgmlType::F32,
            WeightData::Raw { ty, .. } | WeightData::Interleaved { ty, .. } => *ty,
            WeightData::Stacked(parts) => parts.first().map_or(GgmlType::F32, Weight::ty),
        }
    }

    /// Bytes the weight occupies.
    pub fn nbytes(&self) -> usize {
        match &self.data {
            WeightData::F32(v) => v.len() * 4,
            WeightData::Raw { bytes, .. } | WeightData::Interleaved { bytes, .. } => bytes.len(),
            WeightData::Stacked(parts) => parts.iter().map(Weight::nbytes).sum(),
        }
    }

    /// `parts` (equal widths) stacked by rows: one weight whose matmul runs each part with
    /// its own kernel. Errors if the widths differ.
    pub fn stacked(parts: Vec<Weight>) -> Result<Weight, KernelError> {
        let cols = parts.first().map_or(0, |w| w.cols);
        if parts.iter().any(|w| w.cols != cols) {
            return Err(KernelError::Shape {
                op: "Weight::stacked",
                detail: "parts of different widths".into(),
            });
        }
        let rows = parts.iter().map(|w| w.rows).sum();
        Ok(Weight {
            rows,
            cols,
            data: WeightData::Stacked(parts),
        })
    }

    /// This weight in the CPU matmul's interleaved layout where its type has one (see
    /// `quant::interleave::supports`) and its rows are a multiple of eight, whole and
    /// consistent; otherwise unchanged.
    /// Values, `row_to_f32` and every matmul's shape rules stay the same; only the kernel and
    /// the rounding order of its sums change.
    pub fn interleaved(self) -> Weight {
        self.interleaved_where(crate::quant::interleave::supports)
    }

    /// [`Weight::interleaved`] for the types `keep` accepts (and that have the layout); the
    /// parts of a stacked weight each by their own type.
    pub fn interleaved_where(self, keep: fn(GgmlType) -> bool) -> Weight {
        let Weight { rows, cols, data } = self;
        let data = match data {
            WeightData::Raw { ty, bytes }
                if crate::quant::interleave::supports(ty)
                    && keep(ty)
                    && rows % crate::quant::interleave::GROUP == 0
                    && ty.bytes_for(cols).ok().and_then(|rb| rb.checked_mul(rows))
                        == Some(bytes.len()) =>
            {
                let row_bytes = bytes.len() / rows.max(1);
                let bytes = crate::quant::interleave::interleave(ty, &bytes, row_bytes);
                WeightData::Interleaved { ty, bytes }
            }
            WeightData::Stacked(parts) => WeightData::Stacked(
                parts
                    .into_iter()
                    .map(|p| p.interleaved_where(keep))
                    .collect(),
            ),
            other => other,
        };
        Weight { rows, cols, data }
    }

    /// Writes row `i` as f32 into `out` (`out.len() == cols`). Used by embedding lookups.
    /// Errors (never panics) on a bad row index or length, or storage too short for the shape
    /// (the fields are public, so a `Weight` can be built inconsistent).
    pub fn row_to_f32(&self, i: usize, out: &mut [f32]) -> Result<(), KernelError> {
        let shape_err = || KernelError::Shape {
            op: "Weight::row_to_f32",
            detail: format!(
                "row {i} of {}x{} {} into {}",
                self.rows,
                self.cols,
                self.ty(),
                out.len()
            ),
        };
        if i >= self.rows || out.len() != self.cols {
            return Err(shape_err());
        }
        match &self.data {
            WeightData::F32(v) => {
                let row = v
                    .get(i * self.cols..(i + 1) * self.cols)
                    .ok_or_else(shape_err)?;
                out.copy_from_slice(row);
                Ok(())
            }
            WeightData::Raw { ty, bytes } => {
                let rb = ty.bytes_for(self.cols)?;
                let row = bytes.get(i * rb..(i + 1) * rb).ok_or_else(shape_err)?;
                crate::quant::dequantize(*ty, row, out)
            }
            WeightData::Interleaved { ty, .. } => {
                let mut raw = vec![0u8; ty.bytes_for(self.cols)?];
                self.raw_rows(i, 1, &mut raw)?;
                crate::quant::dequantize(*ty, &raw, out)
            }
            WeightData::Stacked(parts) => {
                let (part, r) = self.part_of(i).ok_or_else(shape_err)?;
                parts[part].row_to_f32(r, out)
            }
        }
    }

    /// For stacked parts: which part holds row `i`, and its row there.
    fn part_of(&self, i: usize) -> Option<(usize, usize)> {
        let WeightData::Stacked(parts) = &self.data else {
            return None;
        };
        let mut r = i;
        for (k, p) in parts.iter().enumerate() {
            if r < p.rows {
                return Some((k, r));
            }
            r -= p.rows;
        }
        None
    }

    /// Rows `r0..r0 + n` of a quantised weight in ggml's row-major block layout (`out` holds
    /// exactly those rows), whichever layout the weight is kept in.
    pub fn raw_rows(&self, r0: usize, n: usize, out: &mut [u8]) -> Result<(), KernelError> {
        let (ty, bytes) = match &self.data {
            WeightData::Raw { ty, bytes } | WeightData::Interleaved { ty, bytes } => (*ty, bytes),
            WeightData::F32(_) | WeightData::Stacked(_) => {
                return Err(KernelError::Invalid(
                    "an f32 or stacked weight has no raw rows of one type".into(),
                ))
            }
        };
        let rb = ty.bytes_for(self.cols)?;
        let stored = match &self.data {
            WeightData::Interleaved { .. } => crate::quant::interleave::row_bytes(ty, self.cols)?,
            _ => rb,
        };
        let end = r0.checked_add(n).filter(|&e| e <= self.rows);
        let whole = bytes.len() == self.rows * stored;
        if end.is_none() || out.len() != n * rb || !whole {
            return Err(KernelError::Shape {
                op: "Weight::raw_rows",
                detail: format!(
                    "rows {r0}..+{n} of {}x{} {ty} into {} bytes",
                    self.rows,
                    self.cols,
                    out.len()
                ),
            });
        }
        match &self.data {
            WeightData::Interleaved { .. } => {
                for (k, o) in out.chunks_exact_mut(rb.max(1)).enumerate() {
                    crate::quant::interleave::raw_row(ty, bytes, rb, r0 + k, o);
                }
            }
            _ => out.copy_from_slice(&bytes[r0 * rb..(r0 + n) * rb]),
        }
        Ok(())
    }

    /// The whole matrix as f32 (tests and conversions; not the inference path).
    pub fn to_f32(&self) -> Result<Vec<f32>, KernelError> {
        let n = self.rows.checked_mul(self.cols).ok_or_else(|| {
            KernelError::Invalid(format!("a {}x{} weight overflows", self.rows, self.cols))
        })?;
        let mut out = vec![0.0; n];
        for (i, row) in out.chunks_mut(self.cols.max(1)).enumerate().take(self.rows) {
            self.row_to_f32(i, row)?;
        }
        Ok(out)
    }
}
