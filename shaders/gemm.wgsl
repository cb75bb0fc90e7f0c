// Register-blocked block products: a workgroup of GEMM_WG invocations computes a 64 x 64 block
// of a product A B. The depth is staged GEMM_BK at a time through workgroup memory, and each
// invocation keeps a 4 x 4 micro-block in registers, so each vec4 read from workgroup memory
// feeds 16 multiply-adds rather than one (the tile engine's dot products read two values per
// multiply-add).
//
// The including shader provides
//   fn gemm_a(src: u32, m: u32, k: u32) -> f32    element (m, k) of a left factor
//   fn gemm_b(src: u32, k: u32, n: u32) -> f32    element (k, n) of a right factor
// where `src` names the factor (one entry point may sum several products). They are called
// only for m < rows, k < depth and n < cols as given to gemm_product; elements outside read
// as zero. Invocation `lid` owns rows gemm_row(lid) + 0..3 and columns gemm_col(lid) + 0..3
// of the block, held as acc[row][column].

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

// Each invocation stages one vec4 of each factor: four consecutive rows (columns) at one
// depth, its slot (depth, vec4 within the row). `along` says the factor is contiguous in
// memory along rows (A) or columns (B), as a transposed matrix is (for A), so neighbouring
// invocations take neighbouring rows; otherwise they take neighbouring depths.
fn gemm_slot(along: bool, lid: u32) -> vec2<u32> {
    if (along) {
        return vec2(lid / 16u, lid % 16u);
    }
    return vec2(lid % 16u, lid / 16u);
}

fn gemm_fetch_a(src: u32, m0: u32, rows: u32, k0: u32, depth: u32, slot: vec2<u32>) -> vec4<f32> {
    let k = k0 + slot.x;
    let m = m0 + slot.y * 4u;
    return vec4(
        gemm_a_in(src, m, k, rows, depth),
        gemm_a_in(src, m + 1u, k, rows, depth),
        gemm_a_in(src, m + 2u, k, rows, depth),
        gemm_a_in(src, m + 3u, k, rows, depth),
    );
}

fn gemm_fetch_b(src: u32, n0: u32, cols: u32, k0: u32, depth: u32, slot: vec2<u32>) -> vec4<f32> {
    let k = k0 + slot.x;
    let n = n0 + slot.y * 4u;
    return vec4(
        gemm_b_in(src, k, n, depth, cols),
        gemm_b_in(src, k, n + 1u, depth, cols),
        gemm_b_in(src, k, n + 2u, depth, cols),
        gemm_b_in(src, k, n + 3u, depth, cols),
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
    let slot_a = gemm_slot(a_along_m, lid);
    let slot_b = gemm_slot(b_along_n, lid);
    // Software pipelining: the next depth step is read from memory while this one's
    // multiply-adds run, so its latency hides behind them even with few workgroups resident.
    var next_a = gemm_fetch_a(src_a, m0, rows, 0u, depth, slot_a);
    var next_b = gemm_fetch_b(src_b, n0, cols, 0u, depth, slot_b);
    for (var k0 = 0u; k0 < depth; k0 += GEMM_BK) {
        workgroupBarrier();
        gemm_as[slot_a.x * GEMM_LD + slot_a.y] = next_a;
        gemm_bs[slot_b.x * GEMM_LD + slot_b.y] = next_b;
        workgroupBarrier();
        if (k0 + GEMM_BK < depth) {
            next_a = gemm_fetch_a(src_a, m0, rows, k0 + GEMM_BK, depth, slot_a);
            next_b = gemm_fetch_b(src_b, n0, cols, k0 + GEMM_BK, depth, slot_b);
        }
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
