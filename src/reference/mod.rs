//! CPU references of every kernel, in f64, written for clarity rather than speed. The GPU
//! kernels are tested against these.

pub mod copy;
pub mod gibbs;
pub mod softmax;
