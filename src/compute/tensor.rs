//! Host tensors: a shape and a dense row-major `Vec<f32>`. Weights are loaded into these, folded,
//! then handed to a backend; the CPU backend also computes on them directly.

use crate::error::{Error, Result};

/// A dense f32 tensor in host memory, row-major (the last dimension is contiguous).
/// Activations are 4-D NCHW; weights use PyTorch's layouts (conv `[out, in/groups, kh, kw]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// A tensor from a shape and matching data. Errors when the element counts differ.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Shape {
                op: "Tensor::new",
                detail: format!(
                    "shape {shape:?} holds {n} elements but {} were given",
                    data.len()
                ),
            });
        }
        Ok(Tensor { shape, data })
    }

    /// A tensor filled with zeros.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape,
            data: vec![0.0; n],
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The shape as NCHW; errors unless the tensor is 4-D.
    pub fn dims4(&self, op: &'static str) -> Result<[usize; 4]> {
        match self.shape[..] {
            [n, c, h, w] => Ok([n, c, h, w]),
            _ => Err(Error::Shape {
                op,
                detail: format!("expected a 4-D NCHW tensor, got shape {:?}", self.shape),
            }),
        }
    }

    /// Same data, new shape with the same element count.
    pub fn reshape(self, shape: Vec<usize>) -> Result<Self> {
        Tensor::new(shape, self.data)
    }
}
