// Register-blocked block products: a workgroup of GEMM_WG invocations (16 x 16) computes a
// GEMM_BM x GEMM_BN block of a product A B. The depth is staged GEMM_BK at a time through
// workgroup memory, and each invocation keeps a GEMM_TM x 4 micro-block in registers, so each
// vec4 read from workgroup memory feeds 4 GEMM_TM multiply-adds rather than one (the tile
// engine's dot products read two values per multiply-add).
//
// The including shader provides
//   const GEMM_TM: u32                              rows per invocation, 4 or 2: 64 or 32 rows
//                                                   per block (fewer rows, more workgroups
//                                                   for small problems)
//   fn gemm_a(src: u32, m: u32, k: u32) -> f32    element (m, k) of a left factor
//   fn gemm_b(src: u32, k: u32, n: u32) -> f32    element (k, n) of a right factor
// where `src` names the factor (one entry point may sum several products). They are called
// only for m < rows, k < depth and n < cols as given to gemm_product; elements outside read
// as zero. Invocation `lid` owns rows gemm_row(lid) + 0..3 and columns gemm_col(lid) + 0..3
// of the block, held as acc[row][column].

const GEMM_WG: u32 = 256u;
const GEMM_BM: u32 = 16u * GEMM_TM;
const GEMM_BN: u32 = 64u;
const GEMM_BK: u32 = 16u;
// vec4s per staged depth row, one more than the block's so that the loaders' writes spread
// over the memory banks.
const GEMM_LDA: u32 = GEMM_BM / 4u + 1u;
const GEMM_LDB: u32 = GEMM_BN / 4u + 1u;
// vec4 slots of a staged left factor (the right factor has GEMM_WG).
const GEMM_SLOTS_A: u32 = GEMM_BK * GEMM_BM / 4u;

var<workgroup> gemm_as: array<vec4<f32>, GEMM_BK * GEMM_LDA>;  // [k][m / 4]
var<workgroup> gemm_bs: array<vec4<f32>, GEMM_BK * GEMM_LDB>;  // [k][n / 4]

// An invocation's micro-block: GEMM_TM rows of 4 columns.
alias GemmAcc = array<vec4<f32>, GEMM_TM>;

fn gemm_row(lid: u32) -> u32 {
    return (lid / 16u) * GEMM_TM;
}

fn gemm_col(lid: u32) -> u32 {
    return (lid % 16u) * 4u;
}

fn gemm_a_in(src: u32, m: u32, k: u32, rows: u32, depth: u32) -> f32 {
    if (m < rows && k < depth) {
        return gemm_a(src, m, k);
    }
    return 0.0;
}

fn gemm_b_in(src: u32, k: u32, n: u32, depth: u32, cols: u32) -> f32 {
    if (k < depth && n < cols) {
        return gemm_b(src, k, n);
    }
    return 0.0;
}

// An invocation stages a vec4 of each factor: four consecutive rows (columns) at one depth.
// `a_along_m` says the left factor is contiguous in memory along m (it is a transposed
// matrix), so neighbouring invocations take neighbouring rows; otherwise they take
// neighbouring depths. Likewise `b_along_n` for the right factor.
fn gemm_stage(
    src_a: u32, src_b: u32, m0: u32, rows: u32, n0: u32, cols: u32, k0: u32, depth: u32,
    a_along_m: bool, b_along_n: bool, lid: u32,
) {
    if (lid < GEMM_SLOTS_A) {
        var ka = lid % GEMM_BK;
        var ma = lid / GEMM_BK;
        if (a_along_m) {
            ka = lid / (GEMM_BM / 4u);
            ma = lid % (GEMM_BM / 4u);
        }
        let k = k0 + ka;
        let m = m0 + ma * 4u;
        gemm_as[ka * GEMM_LDA + ma] = vec4(
            gemm_a_in(src_a, m, k, rows, depth),
            gemm_a_in(src_a, m + 1u, k, rows, depth),
            gemm_a_in(src_a, m + 2u, k, rows, depth),
            gemm_a_in(src_a, m + 3u, k, rows, depth),
        );
    }
    var kb = lid % GEMM_BK;
    var nb = lid / GEMM_BK;
    if (b_along_n) {
        kb = lid / (GEMM_BN / 4u);
        nb = lid % (GEMM_BN / 4u);
    }
    let kk = k0 + kb;
    let n = n0 + nb * 4u;
    gemm_bs[kb * GEMM_LDB + nb] = vec4(
        gemm_b_in(src_b, kk, n, depth, cols),
        gemm_b_in(src_b, kk, n + 1u, depth, cols),
        gemm_b_in(src_b, kk, n + 2u, depth, cols),
        gemm_b_in(src_b, kk, n + 3u, depth, cols),
    );
}

// acc += A[m0 .. m0 + GEMM_BM, 0 .. depth] B[0 .. depth, n0 .. n0 + GEMM_BN] for this
// invocation's micro-block. Every argument but acc and lid must be uniform across the
// workgroup.
fn gemm_product(
    acc: ptr<function, GemmAcc>,
    src_a: u32, src_b: u32, m0: u32, rows: u32, n0: u32, cols: u32, depth: u32,
    a_along_m: bool, b_along_n: bool, lid: u32,
) {
    let row = gemm_row(lid);
    let tx = lid % 16u;
    for (var k0 = 0u; k0 < depth; k0 += GEMM_BK) {
        workgroupBarrier();
        gemm_stage(src_a, src_b, m0, rows, n0, cols, k0, depth, a_along_m, b_along_n, lid);
        workgroupBarrier();
        for (var k = 0u; k < GEMM_BK; k++) {
            // This invocation's GEMM_TM rows lie in one staged vec4 (GEMM_TM divides 4).
            let a = gemm_as[k * GEMM_LDA + row / 4u];
            let b = gemm_bs[k * GEMM_LDB + tx];
            for (var i = 0u; i < GEMM_TM; i++) {
                (*acc)[i] = fma(vec4(a[row % 4u + i]), b, (*acc)[i]);
            }
        }
    }
}
