//! .npy input and output for `seqk run` (C order only).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek};
use std::path::{Path, PathBuf};

use half::f16;
use npyz::WriterBuilder;

use super::{usage, CliError};

/// Element data of an .npy array.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// float32
    F32(Vec<f32>),
    /// float16
    F16(Vec<f16>),
    /// int32
    I32(Vec<i32>),
    /// int64
    I64(Vec<i64>),
    /// bool
    Bool(Vec<bool>),
    /// A dtype no input takes (float64, ...), by its .npy name; not read. The input that gets
    /// it says which dtypes and shape it expects.
    Other(String),
    /// uint8
    U8(Vec<u8>),
}

/// An .npy array: shape and data.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    /// Shape (C order).
    pub shape: Vec<usize>,
    /// Elements.
    pub data: Data,
}

impl Data {
    /// numpy's name of the dtype.
    pub fn dtype_name(&self) -> &str {
        match self {
            Data::F32(_) => "float32",
            Data::F16(_) => "float16",
            Data::I32(_) => "int32",
            Data::I64(_) => "int64",
            Data::Bool(_) => "bool",
            Data::U8(_) => "uint8",
            Data::Other(name) => name,
        }
    }
}

impl Array {
    /// The elements as f32, and whether they were float16. Other dtypes are an error naming
    /// the input and its expected `shape`.
    pub fn floats(&self, name: &str, shape: &str) -> Result<(Vec<f32>, bool), CliError> {
        match &self.data {
            Data::F32(v) => Ok((v.clone(), false)),
            Data::F16(v) => Ok((v.iter().map(|h| h.to_f32()).collect(), true)),
            other => Err(usage(format!(
                "input {name} has dtype {}; expected {shape} float32 or float16",
                other.dtype_name()
            ))),
        }
    }

    /// The elements of a mask: bool, or uint8 with nonzero = true.
    pub fn bools(self, name: &str, shape: &str) -> Result<Vec<bool>, CliError> {
        match self.data {
            Data::Bool(v) => Ok(v),
            Data::U8(v) => Ok(v.into_iter().map(|b| b != 0).collect()),
            other => Err(usage(format!(
                "input {name} has dtype {}; expected {shape} bool or uint8",
                other.dtype_name()
            ))),
        }
    }
}

/// Refuses a header whose shape has more elements than memory can address, before npyz
/// reads it: npyz multiplies the dims unchecked (a panic in debug builds, a wrapped count that
/// a few values fill in release). Headers this cannot read are left to npyz's own errors.
/// `head` is the file's first 64 KiB (magic, version, length, then a header of at most a few
/// KiB in practice).
fn check_declared_shape(path: &Path, head: &[u8]) -> Result<(), String> {
    if !head.starts_with(b"\x93NUMPY") {
        return Ok(());
    }
    let (len, start) = match head.get(6) {
        Some(1) if head.len() >= 10 => (u16::from_le_bytes([head[8], head[9]]) as usize, 10),
        Some(2 | 3) if head.len() >= 12 => (
            u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize,
            12,
        ),
        _ => return Ok(()),
    };
    let Some(text) = head.get(start..start + len).map(String::from_utf8_lossy) else {
        return Ok(());
    };
    let key = text.find("'shape'").or_else(|| text.find("\"shape\""));
    let Some(tuple) = key
        .map(|at| &text[at + 7..])
        .and_then(|rest| rest.split_once('('))
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(dims, _)| dims)
    else {
        return Ok(());
    };
    let dims: Option<Vec<usize>> = tuple
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.trim_end_matches('L').parse().ok())
        .collect();
    let Some(dims) = dims else { return Ok(()) };
    if dims.contains(&0) || crate::tensor::checked_numel(&dims).is_some() {
        return Ok(());
    }
    Err(format!(
        "{}: shape {dims:?} has more elements than memory can address",
        path.display()
    ))
}

/// Reads a C-order .npy file of f32, f16, i32, i64, bool or u8; other plain dtypes are kept
/// by name only (`Data::Other`), refused where an input is used.
pub fn read(path: &Path) -> Result<Array, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut head = Vec::new();
    std::io::Read::by_ref(&mut file)
        .take(1 << 16)
        .read_to_end(&mut head)
        .and_then(|_| file.rewind())
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    check_declared_shape(path, &head)?;
    let npy = npyz::NpyFile::new(BufReader::new(file))
        .map_err(|e| format!("{} is not an .npy file: {e}", path.display()))?;
    if npy.order() != npyz::Order::C {
        return Err(format!(
            "{} is in Fortran order; save it C-contiguous (np.ascontiguousarray)",
            path.display()
        ));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let dtype = npy.dtype();
    let npyz::DType::Plain(ts) = &dtype else {
        return Err(format!(
            "{}: structured dtypes are not supported",
            path.display()
        ));
    };
    let kind = (ts.type_char(), ts.size_field());
    // The header's product, checked: a wrapped one would read a few values as a huge shape.
    let fits = |n: &usize| n.checked_mul(ts.size_field() as usize).is_some();
    let elements = match crate::tensor::checked_numel(&shape).filter(fits) {
        _ if shape.contains(&0) => 0,
        Some(n) => n,
        None => {
            return Err(format!(
                "{}: shape {shape:?} has more elements than memory can address",
                path.display()
            ))
        }
    };
    let bad = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => format!(
            "{} ends before the {elements} elements its header declares (shape {shape:?})",
            path.display()
        ),
        _ => format!("reading {}: {e}", path.display()),
    };
    use npyz::TypeChar::*;
    let data = match kind {
        (Float, 4) => Data::F32(npy.into_vec().map_err(bad)?),
        (Float, 2) => Data::F16(npy.into_vec().map_err(bad)?),
        (Int, 4) => Data::I32(npy.into_vec().map_err(bad)?),
        (Int, 8) => Data::I64(npy.into_vec().map_err(bad)?),
        (Bool, 1) => Data::Bool(npy.into_vec().map_err(bad)?),
        (Uint, 1) => Data::U8(npy.into_vec().map_err(bad)?),
        (c, size) => Data::Other(numpy_name(c, size).unwrap_or_else(|| ts.to_string())),
    };
    Ok(Array { shape, data })
}

/// numpy's name of a plain dtype (float64, int8, ...), for messages; None for the rarer kinds,
/// which keep their .npy code (<c16, |S5).
fn numpy_name(c: npyz::TypeChar, size: u64) -> Option<String> {
    use npyz::TypeChar::*;
    let kind = match c {
        Float => "float",
        Int => "int",
        Uint => "uint",
        _ => return None,
    };
    Some(format!("{kind}{}", 8 * size))
}

/// The file a write to `path` lands in: symbolic links followed (File::create follows them,
/// and the last may name a file not there yet), the directory made absolute, so that two
/// spellings of one output compare equal.
pub fn written_file(path: &Path) -> Result<PathBuf, String> {
    let mut path = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&path).map_err(|e| e.to_string())?;
                path = path.parent().unwrap_or(Path::new("")).join(target);
            }
            _ => {
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                return Ok(match (std::fs::canonicalize(dir), path.file_name()) {
                    (Ok(dir), Some(name)) => dir.join(name),
                    _ => path,
                });
            }
        }
    }
    Err("too many levels of symbolic links".into())
}

/// Checks that `path` can be written without changing anything there: an existing file is
/// opened for writing (not truncated), a missing one is created and removed again.
pub fn check_writable(path: &Path) -> Result<(), String> {
    let path = written_file(path)?;
    if path.is_dir() {
        return Err("it is a directory".into());
    }
    if path.exists() {
        std::fs::OpenOptions::new().write(true).open(path).map(drop)
    } else {
        File::create_new(&path).and_then(|_| std::fs::remove_file(&path))
    }
    .map_err(|e| e.to_string())
}

/// Writes an array as .npy (C order).
pub fn write(path: &Path, array: &Array) -> Result<(), String> {
    let file = File::create(path).map_err(|e| e.to_string())?;
    let shape: Vec<u64> = array.shape.iter().map(|&d| d as u64).collect();
    let w = BufWriter::new(file);
    fn put<T: npyz::AutoSerialize + Copy>(
        w: BufWriter<File>,
        shape: &[u64],
        v: &[T],
    ) -> std::io::Result<()> {
        let mut writer = npyz::WriteOptions::new()
            .default_dtype()
            .shape(shape)
            .writer(w)
            .begin_nd()?;
        writer.extend(v.iter().copied())?;
        writer.finish()
    }
    match &array.data {
        Data::F32(v) => put(w, &shape, v),
        Data::F16(v) => put(w, &shape, v),
        Data::I32(v) => put(w, &shape, v),
        Data::I64(v) => put(w, &shape, v),
        Data::Bool(v) => put(w, &shape, v),
        Data::U8(v) => put(w, &shape, v),
        Data::Other(name) => {
            return Err(format!(
                "cannot write dtype {name}: only read inputs hold it"
            ))
        }
    }
    .map_err(|e| e.to_string())
}
