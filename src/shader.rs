//! Shader variants: a family's WGSL with a small header that picks the storage type and
//! feature flavour, plus override constants. The pipeline cache and the naga test both take
//! this description, so whatever the crate can run is also what the test translates.

use crate::tensor::DType;

/// Everything needed to build one compute pipeline.
#[derive(Clone, Debug)]
pub struct ShaderVariant {
    /// Kernel family, e.g. `"softmax"`.
    pub family: &'static str,
    /// Variant label; together with `family` it determines `source` exactly.
    pub variant: String,
    /// The complete WGSL module (header + shared snippets + family source).
    pub source: String,
    /// Entry point.
    pub entry: &'static str,
    /// Values of the module's `override` constants.
    pub constants: Vec<(String, f64)>,
}

/// The one-line header that sets the storage type `elem` of a shader.
///
/// f32 storage is `alias elem = f32;`; native f16 storage also enables the extension.
/// Arithmetic is always done in f32 (`f32(x)` on load, `elem(y)` on store).
pub fn elem_header(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "enable f16;\nalias elem = f16;\n",
        _ => "alias elem = f32;\n",
    }
}

/// Workgroup-grid snippet: the linear workgroup index of a grid folded into x, y, z.
pub const GRID_WGSL: &str = include_str!("../shaders/grid.wgsl");
/// Register-blocked block products (shaders/gemm.wgsl); see that file for what includers provide.
pub const GEMM_WGSL: &str = include_str!("../shaders/gemm.wgsl");

/// Concatenates WGSL pieces into one module (headers first).
pub fn compose(pieces: &[&str]) -> String {
    let mut s = String::new();
    for p in pieces {
        s.push_str(p);
        if !p.ends_with('\n') {
            s.push('\n');
        }
    }
    s
}
