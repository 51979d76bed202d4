//! A small host tensor: a shape and f32 data. Not a general tensor library; the model's
//! activations are plain row-major f32 buffers on the CPU path.

use crate::{DType, Device, KernelError};

/// Row-major f32 host tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; n],
        }
    }

    /// Wraps `data`, checking that it fills `shape`.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Self, KernelError> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(KernelError::Shape {
                op: "Tensor::from_vec",
                detail: format!("shape {shape:?} needs {n} elements, got {}", data.len()),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        DType::F32
    }
    pub fn device(&self) -> Device {
        Device::Cpu
    }
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }
    /// Row `i` of a tensor viewed as [rows, last_dim].
    pub fn row(&self, i: usize) -> &[f32] {
        let d = *self.shape.last().unwrap_or(&1);
        &self.data[i * d..(i + 1) * d]
    }
}
