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
/// Rows and columns of gemm.wgsl's blocks (its `GEMM_BLOCK`): the host's grid unit.
pub const GEMM_BLOCK: usize = 64;

/// The workgroup-reduction snippet (`Lanes`, `reduce_max_sum`, `reduce_sum4`): subgroup
/// operations where the device has them, else shared memory. The two files define the same
/// names, so a shader includes either one unchanged.
pub fn reduce_wgsl(subgroups: bool) -> &'static str {
    if subgroups {
        include_str!("../shaders/reduce_subgroup.wgsl")
    } else {
        include_str!("../shaders/reduce_shared.wgsl")
    }
}

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

/// How a shader declares one of its group-0 buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `var<uniform>`.
    Uniform,
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    ReadWrite,
}

/// A group-0 buffer declaration of a shader: binding index, variable name and access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declared {
    /// `@binding(index)`.
    pub index: u32,
    /// The variable's name.
    pub name: String,
    /// How it may be accessed.
    pub access: Access,
}

/// The buffers a WGSL module declares in group 0, read from lines of the form
/// `@group(0) @binding(N) var<storage, read_write> name: ...` (the form every shader of the
/// crate uses; the naga test checks this reading against naga's for every variant).
pub fn declared_bindings(source: &str) -> Vec<Declared> {
    source
        .lines()
        .filter_map(|line| {
            let code = line.split("//").next()?.trim();
            let rest = code.strip_prefix("@group(0)")?.trim_start();
            let rest = rest.strip_prefix("@binding(")?;
            let (index, rest) = rest.split_once(')')?;
            let rest = rest.trim_start().strip_prefix("var<")?;
            let (space, rest) = rest.split_once('>')?;
            let name = rest.split(':').next()?.trim();
            let space: Vec<&str> = space.split(',').map(str::trim).collect();
            let access = match space[..] {
                ["uniform"] => Access::Uniform,
                ["storage"] | ["storage", "read"] => Access::Read,
                ["storage", "read_write"] => Access::ReadWrite,
                _ => return None,
            };
            Some(Declared {
                index: index.trim().parse().ok()?,
                name: name.to_string(),
                access,
            })
        })
        .collect()
}
