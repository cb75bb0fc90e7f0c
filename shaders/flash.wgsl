// FLASH mixed-chunk attention (GAU): quadratic attention inside chunks plus linear attention
// across chunks, as three passes of block products (shaders/gemm.wgsl).
//
// Prepended by the host: `alias elem = f32|f16;`, shaders/grid.wgsl and shaders/gemm.wgsl.
//   flash_chunks  one workgroup per block of either
//                 (batch, chunk, 64 x 64 block of the chunk's C x C scores):
//                 P = f(kappa qq kq^T + bias), zero where the key is masked, padded or (causal)
//                 later than the query; blocks wholly above the diagonal are skipped (causal);
//                 or (batch, chunk, part, 64 x 64 block of s x e):
//                 KV_g = kl_g^T v_g over the chunk's valid keys (in `splits` parts of its keys
//                 when the call is small), and the chunk's valid-key count.
//   flash_scan    one invocation per (batch, KV element or count): the exclusive prefix over
//                 chunks in place, adding the parts (slot g = state + sum_{h<g} KV_h, slot
//                 G = state + all), and, when decoding or in segments, the new state.
//   flash_out     one workgroup per (batch, chunk, 64 x 64 block of the chunk's C x e output):
//                 y = z ql KV_slot + P v (causal: key blocks up to the diagonal), gate, write.
// Each score is computed once and read by every column block of the output. Masked and padded
// keys contribute nothing: their kl and v rows read as zero and their scores are never passed
// to the activation. Positions of fused RoPE come from a host (cos, sin) table (the RoPE
// family's), indexed by row; rows are rotated as the block products read them.

// When the whole call would not fit storage bindings, the host runs it as segments (one batch
// item's run of chunks, rows renumbered from 0, n = the segment's rows) and binds each tensor
// from an aligned offset at or before the segment's first row; qk_base, v_base (also gate and
// out) and mask_base are that row's element offsets inside the bindings. batch_rows is the
// rows per batch item of the inputs (n, or a decoder's chunk capacity C); out has n - row_begin.
struct Params {
    n: u32, s: u32, e: u32, chunk: u32,
    groups: u32, tiles: u32, stiles: u32, etiles: u32,
    batch: u32, row_begin: u32, flags: u32, norm: u32,
    kappa: f32, lin_scale: f32, rope_base: u32, count_base: u32,
    pstride: u32, qk_base: u32, v_base: u32, mask_base: u32,
    batch_rows: u32, splits: u32, split_len: u32, pad0: u32,
}

const FLAG_CAUSAL: u32 = 1u;
const FLAG_GATE: u32 = 2u;
const FLAG_BIAS: u32 = 4u;
const FLAG_MASK: u32 = 8u;
const FLAG_ROPE: u32 = 16u;
const FLAG_LAPLACE: u32 = 32u;
const FLAG_UPDATE_STATE: u32 = 64u;
const FLAG_TOTAL_FROM_STATE: u32 = 128u;
const FLAG_NO_STATE: u32 = 256u;        // nothing before this call: KV slot 0 is zero
// Causal `length` over several segments needs every key's count before any output: a first
// sweep only counts into the state, the second takes the total count from it.
const FLAG_COUNTS_ONLY: u32 = 512u;
const FLAG_COUNT_FROM_STATE: u32 = 1024u;

// How z is found: the constant lin_scale, 1 / (all valid keys), or 1 / (keys in the prefix).
const NORM_CONSTANT: u32 = 0u;
const NORM_LENGTH: u32 = 1u;
const NORM_PREFIX: u32 = 2u;

@group(0) @binding(0) var<storage, read> qq: array<elem>;
@group(0) @binding(1) var<storage, read> kq: array<elem>;
@group(0) @binding(2) var<storage, read> ql: array<elem>;
@group(0) @binding(3) var<storage, read> kl: array<elem>;
@group(0) @binding(4) var<storage, read> v: array<elem>;
@group(0) @binding(5) var<storage, read> gate: array<elem>;
@group(0) @binding(6) var<storage, read_write> out: array<elem>;
@group(0) @binding(7) var<storage, read> key_mask: array<u32>;  // bytes packed 4 per word
@group(0) @binding(8) var<storage, read> bias: array<f32>;      // [chunk, chunk]
@group(0) @binding(9) var<uniform> p: Params;
// [batch, G + 1, splits, s, e] KV slots (a chunk's keys summed in `splits` parts of
// split_len keys; the scan leaves slot g's prefix in part 0), then [batch, G + 1] valid-key
// counts (from count_base),
// then the (cos, sin) table [n, s / 2] (from rope_base).
@group(0) @binding(10) var<storage, read_write> kv: array<f32>;
// Decoding state: [batch, s, e] sum of KV over completed chunks, then [batch] counts.
@group(0) @binding(11) var<storage, read_write> state: array<f32>;
// Activated scores [batch, G, pstride, pstride], pstride = min(C, n).
@group(0) @binding(12) var<storage, read_write> scores: array<f32>;

// Factors of the block products (gemm_a / gemm_b `src`).
const SRC_QQ: u32 = 0u;   // A: qq rows of the chunk
const SRC_KQ: u32 = 1u;   // B: kq^T
const SRC_QL: u32 = 2u;   // A: ql rows of the chunk
const SRC_KL: u32 = 3u;   // A: kl^T
const SRC_V: u32 = 4u;    // B: v rows of the chunk, zero for invalid keys
const SRC_KV: u32 = 5u;   // B: the KV slot
const SRC_P: u32 = 6u;    // A: activated scores

// The block a workgroup works on, set by the entry point before its products.
var<private> cur_batch: u32;
var<private> cur_c0: u32;     // first row of the chunk
var<private> cur_base: u32;   // first element of the chunk's scores, or of the KV slot

fn has(flag: u32) -> bool {
    return (p.flags & flag) != 0u;
}

// Key j of batch bi exists and is not masked.
fn key_ok(bi: u32, j: u32) -> bool {
    if (j >= p.n) {
        return false;
    }
    if (has(FLAG_MASK)) {
        let e = p.mask_base + bi * p.batch_rows + j;
        return ((key_mask[e >> 2u] >> ((e & 3u) * 8u)) & 0xffu) != 0u;
    }
    return true;
}


// Element (row t, column c) of qq, kq, ql or kl for the current batch item, rotated by the
// row's position when RoPE is fused (half style: pairs (c, c + s/2)).
fn qk_read(src: u32, i: u32) -> f32 {
    switch src {
        case SRC_QQ: { return f32(qq[i]); }
        case SRC_KQ: { return f32(kq[i]); }
        case SRC_QL: { return f32(ql[i]); }
        default: { return f32(kl[i]); }
    }
}

fn qk(src: u32, t: u32, c: u32) -> f32 {
    let row = p.qk_base + (cur_batch * p.batch_rows + t) * p.s;
    let x = qk_read(src, row + c);
    if (!has(FLAG_ROPE)) {
        return x;
    }
    let h = p.s / 2u;
    let at = p.rope_base + 2u * (t * h + c % h);
    let cs = kv[at];
    let sn = kv[at + 1u];
    // The pair (c, c + s/2): the first of it gains -partner sin, the second +partner sin.
    let first = c < h;
    let partner = qk_read(src, row + select(c - h, c + h, first));
    return x * cs + select(sn, -sn, first) * partner;
}

fn gemm_a(src: u32, m: u32, k: u32) -> f32 {
    switch src {
        case SRC_QQ, SRC_QL: { return qk(src, cur_c0 + m, k); }
        case SRC_KL: {
            // A masked key's row is zero, like its v row: whatever it holds (inf, NaN) must
            // not reach the sums as inf * 0.
            return select(0.0, qk(src, cur_c0 + k, m), key_ok(cur_batch, cur_c0 + k));
        }
        default: { return scores[cur_base + m * p.pstride + k]; }
    }
}

fn gemm_b(src: u32, k: u32, n: u32) -> f32 {
    switch src {
        case SRC_KQ: { return qk(src, cur_c0 + n, k); }
        case SRC_V: {
            let j = cur_c0 + k;
            let x = f32(v[p.v_base + (cur_batch * p.batch_rows + j) * p.e + n]);
            return select(0.0, x, key_ok(cur_batch, j));
        }
        default: { return kv[cur_base + k * p.e + n]; }
    }
}

// erfc with a fractional error below 1.2e-7 everywhere (a Chebyshev fit; Numerical Recipes'
// erfcc), so the Laplace function keeps its relative precision far into its tail.
fn erfc_approx(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277))))))));
    let r = t * exp(-z * z + poly);
    return select(2.0 - r, r, x >= 0.0);
}

fn activation(x: f32) -> f32 {
    if (has(FLAG_LAPLACE)) {
        // 0.5 (1 + erf(u)) = 0.5 erfc(-u), u = (x - mu) / (sigma sqrt 2) = (x - mu) sqrt(2 pi),
        // mu = sqrt(1/2), sigma = sqrt(1 / (4 pi)).
        return 0.5 * erfc_approx((0.70710678 - x) * 2.50662827);
    }
    let r = max(x, 0.0);
    return r * r;
}


// The block of workgroup `w`: (batch, chunk, row block, column block) for `rblocks` row and
// `cblocks` column blocks per chunk and `chunks` chunks per batch item.
struct Block {
    batch: u32,
    chunk: u32,
    row0: u32,
    col0: u32,
}

fn block_of(w: u32, rblocks: u32, cblocks: u32, chunks: u32) -> Block {
    var x = w;
    let cb = x % cblocks;
    x /= cblocks;
    let rb = x % rblocks;
    x /= rblocks;
    return Block(x / chunks, x % chunks, rb * GEMM_BLOCK, cb * GEMM_BLOCK);
}

// Rows of chunk g (the last may be partial).
fn chunk_len(g: u32) -> u32 {
    return min(p.n, g * p.chunk + p.chunk) - g * p.chunk;
}

// The chunks' own work, one dispatch: score blocks first, then KV blocks (independent of
// each other, so one pass keeps the GPU fuller than two when there are few chunks).
@compute @workgroup_size(GEMM_WG)
fn flash_chunks(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = linear_workgroup(wid, nwg);
    let score_blocks = p.batch * p.groups * p.tiles * p.tiles;
    if (w < score_blocks) {
        scores_block(w, lid);
    } else {
        kv_block(w - score_blocks, lid);
    }
}

fn scores_block(w: u32, lid: u32) {
    let blk = block_of(w, p.tiles, p.tiles, p.groups);
    let len = chunk_len(blk.chunk);
    cur_batch = blk.batch;
    cur_c0 = blk.chunk * p.chunk;
    cur_base = (blk.batch * p.groups + blk.chunk) * p.pstride * p.pstride;
    // Whole workgroups leave together: past the batch or the (partial) chunk, above the
    // diagonal (causal), or wholly before the first output row.
    if (blk.batch >= p.batch || blk.row0 >= len || blk.col0 >= len
        || (has(FLAG_CAUSAL) && blk.col0 > blk.row0 + GEMM_BLOCK - 1u)
        || cur_c0 + blk.row0 + GEMM_BLOCK <= p.row_begin || has(FLAG_COUNTS_ONLY)) {
        return;
    }
    var acc = gemm_zero();
    gemm_product(&acc, SRC_QQ, SRC_KQ, blk.row0, len, blk.col0, len, p.s, false, false, lid);
    for (var i = 0u; i < 4u; i++) {
        let m = blk.row0 + gemm_row(lid) + i;
        for (var j = 0u; j < 4u; j++) {
            let n = blk.col0 + gemm_col(lid) + j;
            if (m < len && n < len) {
                var a = 0.0;
                if (key_ok(blk.batch, cur_c0 + n) && (!has(FLAG_CAUSAL) || n <= m)) {
                    var sc = p.kappa * acc[i][j];
                    if (has(FLAG_BIAS)) {
                        sc += bias[m * p.chunk + n];
                    }
                    // The activation runs on valid scores only: f(bias) != 0 for laplace.
                    a = activation(sc);
                }
                scores[cur_base + m * p.pstride + n] = a;
            }
        }
    }
}

// One part of one chunk's KV: keys split_len * part onwards (small calls split the chunk's
// keys so that this pass has enough workgroups to fill the GPU; the scan adds the parts).
fn kv_block(w: u32, lid: u32) {
    let blk = block_of(w, p.stiles, p.etiles, p.groups * p.splits);
    if (blk.batch >= p.batch) {
        return;
    }
    let chunk = blk.chunk / p.splits;
    let part = blk.chunk % p.splits;
    let len = chunk_len(chunk);
    let k0 = min(len, part * p.split_len);
    cur_batch = blk.batch;
    cur_c0 = chunk * p.chunk + k0;
    var acc = gemm_zero();
    // Causal outputs read only the sums before their chunk, so the last chunk's KV matters
    // only to a state that gains it.
    let unread = has(FLAG_CAUSAL) && !has(FLAG_UPDATE_STATE) && chunk + 1u == p.groups;
    if (!unread && !has(FLAG_COUNTS_ONLY)) {
        let depth = min(len - k0, p.split_len);
        gemm_product(&acc, SRC_KL, SRC_V, blk.row0, p.s, blk.col0, p.e, depth, true, true, lid);
    }
    let slot = ((blk.batch * (p.groups + 1u) + chunk) * p.splits + part) * p.s;
    for (var i = 0u; i < 4u; i++) {
        let a = blk.row0 + gemm_row(lid) + i;
        for (var j = 0u; j < 4u; j++) {
            let col = blk.col0 + gemm_col(lid) + j;
            if (a < p.s && col < p.e) {
                kv[(slot + a) * p.e + col] = acc[i][j];
            }
        }
    }
    if (part == 0u && blk.row0 == 0u && blk.col0 == 0u && lid == 0u) {
        var count = 0u;
        let c0 = chunk * p.chunk;
        for (var j = c0; j < c0 + len; j++) {
            count += u32(key_ok(blk.batch, j));
        }
        kv[p.count_base + blk.batch * (p.groups + 1u) + chunk] = f32(count);
    }
}

@compute @workgroup_size(GEMM_WG)
fn flash_scan(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_workgroup(wid, nwg) * GEMM_WG + lid;
    let per = p.s * p.e;
    let elems = p.batch * per;
    var base: u32;
    var stride: u32;
    var parts = 1u;
    let st = idx;
    if (idx < elems) {
        let bi = idx / per;
        parts = p.splits;
        stride = parts * per;
        base = bi * (p.groups + 1u) * stride + idx % per;
    } else if (idx < elems + p.batch) {
        let bi = idx - elems;
        base = p.count_base + bi * (p.groups + 1u);
        stride = 1u;
    } else {
        return;
    }
    let is_count = idx >= elems;
    if (has(FLAG_COUNTS_ONLY) && !is_count) {
        return;
    }
    var run = state[st];
    if (has(FLAG_TOTAL_FROM_STATE) || (has(FLAG_COUNT_FROM_STATE) && is_count)) {
        // The state already holds every chunk's sum (non-causal segments) or count.
        kv[base + p.groups * stride] = run;
        return;
    }
    for (var g = 0u; g < p.groups; g++) {
        var x = 0.0;
        for (var part = 0u; part < parts; part++) {
            x += kv[base + g * stride + part * per];
        }
        // Only causal outputs read the slots before the total.
        if (has(FLAG_CAUSAL)) {
            kv[base + g * stride] = run;
        }
        run += x;
    }
    kv[base + p.groups * stride] = run;
    if (has(FLAG_UPDATE_STATE)) {
        state[st] = run;
    }
}

// The normaliser z of the linear branch for batch bi reading KV slot `slot`.
fn lin_z(bi: u32, slot: u32) -> f32 {
    if (p.norm == NORM_CONSTANT) {
        return p.lin_scale;
    }
    var at = slot;
    if (p.norm == NORM_LENGTH) {
        at = p.groups;
    }
    let count = kv[p.count_base + bi * (p.groups + 1u) + at];
    if (count > 0.0) {
        return 1.0 / count;
    }
    return 0.0;
}


@compute @workgroup_size(GEMM_WG)
fn flash_out(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var blk = block_of(linear_workgroup(wid, nwg), p.tiles, p.etiles, p.groups);
    if (has(FLAG_CAUSAL)) {
        // Causal row blocks further down read more keys: issue them first, so that the short
        // ones fill in behind (4-8% faster at n <= 4K on an H200).
        blk.row0 = (p.tiles - 1u) * GEMM_BLOCK - blk.row0;
    }
    let len = chunk_len(blk.chunk);
    cur_batch = blk.batch;
    cur_c0 = blk.chunk * p.chunk;
    if (blk.batch >= p.batch || blk.row0 >= len
        || cur_c0 + blk.row0 + GEMM_BLOCK <= p.row_begin) {
        return;
    }
    var slot = p.groups;
    if (has(FLAG_CAUSAL)) {
        slot = blk.chunk;
    }
    // Linear branch z ql KV_slot, then the quadratic branch P v on top of it.
    var acc = gemm_zero();
    // Nothing precedes chunk 0 of a call without a state: its KV slot is zero.
    if (!(slot == 0u && has(FLAG_NO_STATE))) {
        cur_base = (blk.batch * (p.groups + 1u) + slot) * p.splits * p.s * p.e;
        gemm_product(&acc, SRC_QL, SRC_KV, blk.row0, len, blk.col0, p.e, p.s, false, true, lid);
    }
    let z = lin_z(blk.batch, slot);
    for (var i = 0u; i < 4u; i++) {
        acc[i] *= z;
    }
    var depth = len;
    if (has(FLAG_CAUSAL)) {
        depth = min(len, blk.row0 + GEMM_BLOCK);
    }
    cur_base = (blk.batch * p.groups + blk.chunk) * p.pstride * p.pstride;
    gemm_product(&acc, SRC_P, SRC_V, blk.row0, len, blk.col0, p.e, depth, false, true, lid);

    let rows = p.n - p.row_begin;
    for (var i = 0u; i < 4u; i++) {
        let t = cur_c0 + blk.row0 + gemm_row(lid) + i;
        if (t >= cur_c0 + len || t < p.row_begin) {
            continue;
        }
        for (var j = 0u; j < 4u; j++) {
            let col = blk.col0 + gemm_col(lid) + j;
            if (col < p.e) {
                var y = acc[i][j];
                if (has(FLAG_GATE)) {
                    y *= f32(gate[p.v_base + (blk.batch * p.batch_rows + t) * p.e + col]);
                }
                out[p.v_base + (blk.batch * rows + t - p.row_begin) * p.e + col] = elem(y);
            }
        }
    }
}
