// Register-blocked block products: a workgroup of GEMM_WG invocations computes a 64 x 64 block
// of a product A B. The depth is staged GEMM_BK at a time through workgroup memory, and each
// invocation keeps a 4 x 4 micro-block in registers, so each vec4 read from workgroup memory
// feeds 16 multiply-adds rather than one (a dot product of two staged rows reads two values
// per multiply-add).
//
// The including shader provides
//   fn gemm_a(src: u32, m: u32, k: u32) -> f32    element (m, k) of a left factor
//   fn gemm_b(src: u32, k: u32, n: u32) -> f32    element (k, n) of a right factor
// where `src` names the factor (one entry point may sum several products). They are called
// only for m < rows, k < depth and n < cols as given to gemm_product (which needs rows, cols
// and depth >= 1 when it multiplies anything); elements outside read as zero. Invocation
// `lid` owns rows gemm_row(lid) + 0..3 and columns gemm_col(lid) + 0..3 of the block, held
// as acc[row][column].

const GEMM_WG: u32 = 256u;
const GEMM_BLOCK: u32 = 64u;
const GEMM_BK: u32 = 16u;
// vec4s per staged depth row, one more than the block's 16 so that the loaders' writes
// spread over the memory banks.
const GEMM_LD: u32 = GEMM_BLOCK / 4u + 1u;

var<workgroup> gemm_as: array<vec4<f32>, GEMM_BK * GEMM_LD>;  // [k][m / 4]
var<workgroup> gemm_bs: array<vec4<f32>, GEMM_BK * GEMM_LD>;  // [k][n / 4]

fn gemm_row(lid: u32) -> u32 {
    return (lid / 16u) * 4u;
}

fn gemm_col(lid: u32) -> u32 {
    return (lid % 16u) * 4u;
}

fn gemm_zero() -> array<vec4<f32>, 4> {
    return array<vec4<f32>, 4>(vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));
}

// Outside the factor's bounds the read is clamped to its edge and the value discarded, with no
// branch around the load: the staging loads of a step can then all be in flight at once.
fn gemm_a_in(src: u32, m: u32, k: u32, rows: u32, depth: u32) -> f32 {
    let x = gemm_a(src, min(m, rows - 1u), min(k, depth - 1u));
    return select(0.0, x, m < rows && k < depth);
}

fn gemm_b_in(src: u32, k: u32, n: u32, depth: u32, cols: u32) -> f32 {
    let x = gemm_b(src, min(k, depth - 1u), min(n, cols - 1u));
    return select(0.0, x, k < depth && n < cols);
}

// Each invocation stages one vec4 of each factor: four consecutive rows (columns) at one
// depth. `a_along_m` says the left factor is contiguous in memory along m (it is a transposed
// matrix), so neighbouring invocations take neighbouring rows; otherwise they take
// neighbouring depths. Likewise `b_along_n` for the right factor.
fn gemm_stage(
    src_a: u32, src_b: u32, m0: u32, rows: u32, n0: u32, cols: u32, k0: u32, depth: u32,
    a_along_m: bool, b_along_n: bool, lid: u32,
) {
    var ka = lid % 16u;
    var ma = lid / 16u;
    if (a_along_m) {
        ka = lid / 16u;
        ma = lid % 16u;
    }
    let k = k0 + ka;
    let m = m0 + ma * 4u;
    gemm_as[ka * GEMM_LD + ma] = vec4(
        gemm_a_in(src_a, m, k, rows, depth),
        gemm_a_in(src_a, m + 1u, k, rows, depth),
        gemm_a_in(src_a, m + 2u, k, rows, depth),
        gemm_a_in(src_a, m + 3u, k, rows, depth),
    );
    var kb = lid % 16u;
    var nb = lid / 16u;
    if (b_along_n) {
        kb = lid / 16u;
        nb = lid % 16u;
    }
    let kk = k0 + kb;
    let n = n0 + nb * 4u;
    gemm_bs[kb * GEMM_LD + nb] = vec4(
        gemm_b_in(src_b, kk, n, depth, cols),
        gemm_b_in(src_b, kk, n + 1u, depth, cols),
        gemm_b_in(src_b, kk, n + 2u, depth, cols),
        gemm_b_in(src_b, kk, n + 3u, depth, cols),
    );
}

// acc += A[m0 .. m0 + 64, 0 .. depth] B[0 .. depth, n0 .. n0 + 64] for this invocation's
// micro-block. Every argument but acc and lid must be uniform across the workgroup.
fn gemm_product(
    acc: ptr<function, array<vec4<f32>, 4>>,
    src_a: u32, src_b: u32, m0: u32, rows: u32, n0: u32, cols: u32, depth: u32,
    a_along_m: bool, b_along_n: bool, lid: u32,
) {
    let ty = lid / 16u;
    let tx = lid % 16u;
    for (var k0 = 0u; k0 < depth; k0 += GEMM_BK) {
        workgroupBarrier();
        gemm_stage(src_a, src_b, m0, rows, n0, cols, k0, depth, a_along_m, b_along_n, lid);
        workgroupBarrier();
        for (var k = 0u; k < GEMM_BK; k++) {
            // Components by constant index: a variant indexing them by a variable (rows per
            // invocation as a parameter) ran 4x slower on an H200.
            let a = gemm_as[k * GEMM_LD + ty];
            let b = gemm_bs[k * GEMM_LD + tx];
            (*acc)[0] = fma(vec4(a.x), b, (*acc)[0]);
            (*acc)[1] = fma(vec4(a.y), b, (*acc)[1]);
            (*acc)[2] = fma(vec4(a.z), b, (*acc)[2]);
            (*acc)[3] = fma(vec4(a.w), b, (*acc)[3]);
        }
    }
}
