// Exact attention, FlashAttention-2 style, and a plain matmul on the same block products.
//
// Prepended by the host: `alias elem = f32|f16;`, `const D/DV/ROWS/WG/SLABS` lines,
// shaders/grid.wgsl and shaders/gemm.wgsl. `attention_blocked` (at the end, on gemm.wgsl's
// block products) serves calls without key splits and more query rows than ROWS;
// `attention` the others (decode, few rows, key splits): one workgroup per (batch, kv head,
// ROWS packed query rows[, key split]), each query row with its running max m, running sum l
// and unnormalised accumulator in registers.
// A ragged batch (FLAG_KV_LENS) gives each batch its own keys, batch_keys(bi): every key
// limit, the causal alignment included, is the batch's, so no workgroup reads past them.
// No infinities are computed: m starts at a finite sentinel, l > 0 says a valid key was seen,
// exp runs only on valid scores, and a -inf lse is written as a bit pattern.

struct Params {
    m: u32, n: u32, d: u32, dv: u32,
    hq: u32, group: u32, qtiles: u32, splits: u32,
    q_row: u32, q_head: u32, q_batch: u32, k_row: u32,
    k_head: u32, k_batch: u32, v_row: u32, v_head: u32,
    v_batch: u32, o_row: u32, o_head: u32, o_batch: u32,
    mask_batch: u32, mask_head: u32, flags: u32, chunk: u32,
    scale: f32, softcap: f32, bh: u32, ntiles: u32,
    mask_row: u32, pad0: u32, pad1: u32, pad2: u32,
}

const FLAG_CAUSAL: u32 = 1u;
const FLAG_MASK: u32 = 2u;
const FLAG_LSE: u32 = 4u;
const FLAG_ADDITIVE: u32 = 8u;   // the mask holds f32 terms (bits), not bytes
const FLAG_MATMUL_NN: u32 = 16u; // matmul: C = A B rather than A B^T
const FLAG_KV_LENS: u32 = 32u;   // kv_lens holds each batch's keys (else every batch has p.n)
// The lowest finite f32: every finite score is at least this, so a row whose scores all lie
// below -3e38 still finds its maximum (a higher sentinel would read it as fully masked).
const SENTINEL: f32 = -0x1.fffffep+127f;
const NEG_INF_BITS: u32 = 0xff800000u;

@group(0) @binding(0) var<storage, read> q: array<elem>;
@group(0) @binding(1) var<storage, read> k: array<elem>;
@group(0) @binding(2) var<storage, read> v: array<elem>;
@group(0) @binding(3) var<storage, read_write> out: array<elem>;
@group(0) @binding(4) var<storage, read> mask: array<u32>;  // bytes packed 4 per word, or f32 bits
@group(0) @binding(5) var<uniform> p: Params;
@group(0) @binding(6) var<storage, read_write> lse: array<u32>;     // f32 bits, [b, hq, m]
@group(0) @binding(7) var<storage, read_write> part_o: array<f32>;  // [bh, m, splits, dv]
@group(0) @binding(8) var<storage, read_write> part_ml: array<vec2<f32>>; // [bh, m, splits] (m, l)
// Each batch's keys (a ragged batch), four to a vec4 (a uniform array's stride is 16 bytes):
// a uniform, as the attention entry points already bind 8 storage buffers (wgpu's default
// limit). 16 KiB, the least max_uniform_buffer_binding_size of wgpu's limit sets: 4096
// batches.
@group(0) @binding(9) var<uniform> kv_lens: array<vec4<u32>, 1024>;

const SRC_Q: u32 = 0u;
const SRC_K: u32 = 1u;
const SRC_V: u32 = 2u;

fn has(flag: u32) -> bool {
    return (p.flags & flag) != 0u;
}

// Keys of batch bi: its first n_b positions of k and v. Every limit on keys below is this
// batch's, so a workgroup neither reads nor scores a key past it.
fn batch_keys(bi: u32) -> u32 {
    if (has(FLAG_KV_LENS)) {
        return kv_lens[bi / 4u][bi % 4u];
    }
    return p.n;
}

fn mask_index(bi: u32, h: u32, i: u32, j: u32) -> u32 {
    return bi * p.mask_batch + h * p.mask_head + i * p.mask_row + j;
}

// Whether query i of (batch bi with nb keys, head h) may attend key j. An additive -inf is
// compared as bits, so no infinity enters the arithmetic.
fn visible(bi: u32, nb: u32, h: u32, i: u32, j: u32) -> bool {
    if (i >= p.m || j >= nb) {
        return false;
    }
    // Bottom-right causal alignment against the batch's keys: j <= i + (nb - m).
    if (has(FLAG_CAUSAL) && i32(j) > i32(i) + i32(nb) - i32(p.m)) {
        return false;
    }
    if (has(FLAG_MASK)) {
        let e = mask_index(bi, h, i, j);
        if (has(FLAG_ADDITIVE)) {
            return mask[e] != NEG_INF_BITS;
        }
        if (((mask[e >> 2u] >> ((e & 3u) * 8u)) & 0xffu) == 0u) {
            return false;
        }
    }
    return true;
}

// The additive mask's term of a visible (query, key) pair; 0 without one.
fn mask_term(bi: u32, h: u32, i: u32, j: u32) -> f32 {
    if (has(FLAG_ADDITIVE)) {
        return bitcast<f32>(mask[mask_index(bi, h, i, j)]);
    }
    return 0.0;
}

fn score(dot: f32) -> f32 {
    let s = p.scale * dot;
    if (p.softcap > 0.0) {
        let t = s / p.softcap;
        // Below 1e-4, c tanh(s / c) is s to f32 precision (relative t^2 / 3); a huge cap would
        // otherwise make s / c subnormal, flushed to 0, and every score 0.
        if (abs(t) < 1e-4) {
            return s;
        }
        // tanh saturates in f32 well before 15; the clamp keeps every implementation finite.
        return p.softcap * tanh(clamp(t, -15.0, 15.0));
    }
    return s;
}

fn write_lse(row: u32, m_run: f32, l_run: f32) {
    if (l_run > 0.0) {
        lse[row] = bitcast<u32>(m_run + log(l_run));
    } else {
        lse[row] = NEG_INF_BITS;
    }
}

// (query head, query index) of row `row` of kv head hk's packed rows: the tile path packs
// the query heads of a GQA group into one tile's rows (row = head in the group * m + index),
// so that one workgroup reads its keys and values once for all of them.
fn packed_row(hk: u32, row: u32) -> vec2<u32> {
    return vec2(hk * p.group + row / p.m, row % p.m);
}

// Keys of a split [kbegin, kend) that a tile of packed rows q0 .. q0 + tile_rows of a batch of
// nb keys may see: under causality none past the tile's latest query index's last visible
// key, so the upper triangle is never read.
fn tile_key_end(q0: u32, tile_rows: u32, rows: u32, nb: u32, kend: u32) -> u32 {
    if (!has(FLAG_CAUSAL)) {
        return kend;
    }
    let last = min(q0 + tile_rows, rows) - 1u;
    var i_last = last % p.m;
    if (q0 / p.m != last / p.m) {
        i_last = p.m - 1u; // the tile holds the end of a head's rows
    }
    let lim = i32(i_last) + 1 + i32(nb) - i32(p.m);
    return min(kend, u32(clamp(lim, 0, i32(nb))));
}

// The few-rows path: one workgroup of ROWS_WG invocations per (batch, kv head, tile of ROWS
// packed rows[, key split]). The tile's queries are staged once; each block of ROWS_KB keys is
// scored by all invocations at once (each key's row of K read straight from memory, ROWS_PAIRS
// rows of it an invocation), then each row's ROWS_PER_ROW invocations fold the block into
// their row's online softmax and their ROWS_COLS output columns.
const ROWS_WG: u32 = 256u;
const ROWS_KB: u32 = 64u;
const ROWS_PAIRS: u32 = ROWS * ROWS_KB / ROWS_WG;
const ROWS_APART: u32 = ROWS_WG / ROWS_KB; // tile rows between an invocation's scores
const ROWS_PER_ROW: u32 = ROWS_WG / ROWS;
const ROWS_COLS: u32 = DV / ROWS_PER_ROW;

var<workgroup> rows_q: array<f32, ROWS * D>;             // the tile's queries
var<workgroup> rows_s: array<u32, ROWS * ROWS_KB>;       // score bits; NEG_INF_BITS: hidden

@compute @workgroup_size(ROWS_WG)
fn attention(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = linear_workgroup(wid, nwg);
    let split = g % p.splits;
    let rest = g / p.splits;
    let qt = rest % p.qtiles;
    let unit = rest / p.qtiles; // (batch, kv head)
    let hkv = p.hq / p.group;
    if (unit >= p.bh / p.group) {
        return;
    }
    let bi = unit / hkv;
    let hk = unit % hkv;
    let rows = p.group * p.m;
    let q0 = qt * ROWS;

    for (var e = lid; e < ROWS * D; e += ROWS_WG) {
        let row = q0 + e / D;
        let c = e % D;
        var x = 0.0;
        if (row < rows && c < p.d) {
            let at = packed_row(hk, row);
            x = f32(q[bi * p.q_batch + at.x * p.q_head + at.y * p.q_row + c]);
        }
        rows_q[e] = x;
    }
    let k_base = bi * p.k_batch + hk * p.k_head;
    let v_base = bi * p.v_batch + hk * p.v_head;
    // Splits are sized by the longest batch: one wholly past this batch's keys visits no key
    // and leaves a partial with l = 0, which the merge skips.
    let nb = batch_keys(bi);
    let kbegin = split * p.chunk;
    let kend = tile_key_end(q0, ROWS, rows, nb, min(nb, kbegin + p.chunk));

    // Scoring: key sj of a block, tile rows sr, sr + ROWS_APART, ...
    let sj = lid % ROWS_KB;
    let sr = lid / ROWS_KB;
    // Folding: tile row fr, output columns fc, fc + ROWS_PER_ROW, ... (clamped to the row's
    // last column; the copies are never stored).
    let fr = lid / ROWS_PER_ROW;
    let fc = lid % ROWS_PER_ROW;
    var m_run = SENTINEL;
    var l_run = 0.0;
    var acc: array<f32, ROWS_COLS>;
    for (var t = 0u; t < ROWS_COLS; t++) {
        acc[t] = 0.0;
    }
    for (var j0 = kbegin; j0 < kend; j0 += ROWS_KB) {
        // The previous block's readers are done (and the queries visible on the first pass).
        workgroupBarrier();
        let j = j0 + sj;
        let k_row = k_base + min(j, kend - 1u) * p.k_row;
        var dots: array<f32, ROWS_PAIRS>;
        for (var t = 0u; t < ROWS_PAIRS; t++) {
            dots[t] = 0.0;
        }
        for (var c = 0u; c < p.d; c++) {
            let kc = f32(k[k_row + c]);
            for (var t = 0u; t < ROWS_PAIRS; t++) {
                let r = sr + t * ROWS_APART;
                // Rows past the last (a tile of a small group) are not scored.
                if (q0 + r < rows) {
                    dots[t] = fma(rows_q[r * D + c], kc, dots[t]);
                }
            }
        }
        for (var t = 0u; t < ROWS_PAIRS; t++) {
            let r = sr + t * ROWS_APART;
            var bits = NEG_INF_BITS;
            if (j < kend && q0 + r < rows) {
                let at = packed_row(hk, q0 + r);
                if (visible(bi, nb, at.x, at.y, j)) {
                    bits = bitcast<u32>(score(dots[t]) + mask_term(bi, at.x, at.y, j));
                }
            }
            rows_s[r * ROWS_KB + sj] = bits;
        }
        workgroupBarrier();

        let kcount = min(ROWS_KB, kend - j0);
        var m_new = m_run;
        for (var c = 0u; c < kcount; c++) {
            let b = rows_s[fr * ROWS_KB + c];
            if (b != NEG_INF_BITS) {
                m_new = max(m_new, bitcast<f32>(b));
            }
        }
        var alpha = 0.0;
        if (l_run > 0.0) {
            alpha = exp(m_run - m_new);
        }
        l_run *= alpha;
        for (var t = 0u; t < ROWS_COLS; t++) {
            acc[t] *= alpha;
        }
        let v_block = v_base + j0 * p.v_row;
        for (var c = 0u; c < kcount; c++) {
            let b = rows_s[fr * ROWS_KB + c];
            // A hidden key's value is never read into the sum: junk (NaN, inf) in a masked
            // cache slot stays out.
            if (b != NEG_INF_BITS) {
                let pj = exp(bitcast<f32>(b) - m_new);
                l_run += pj;
                let v_row = v_block + c * p.v_row;
                for (var t = 0u; t < ROWS_COLS; t++) {
                    let col = min(fc + t * ROWS_PER_ROW, p.dv - 1u);
                    acc[t] = fma(pj, f32(v[v_row + col]), acc[t]);
                }
            }
        }
        m_run = m_new;
    }

    if (q0 + fr >= rows) {
        return;
    }
    let at = packed_row(hk, q0 + fr);
    let h = at.x;
    let i = at.y;
    let bh = bi * p.hq + h;
    if (p.splits == 1u) {
        var inv = 0.0;
        if (l_run > 0.0) {
            inv = 1.0 / l_run;
        }
        let o_base = bi * p.o_batch + h * p.o_head + i * p.o_row;
        for (var t = 0u; t < ROWS_COLS; t++) {
            let col = fc + t * ROWS_PER_ROW;
            if (col < p.dv) {
                out[o_base + col] = elem(acc[t] * inv);
            }
        }
        if (has(FLAG_LSE) && fc == 0u) {
            write_lse(bh * p.m + i, m_run, l_run);
        }
    } else {
        let pi = (bh * p.m + i) * p.splits + split;
        for (var t = 0u; t < ROWS_COLS; t++) {
            let col = fc + t * ROWS_PER_ROW;
            if (col < p.dv) {
                part_o[pi * p.dv + col] = acc[t];
            }
        }
        if (fc == 0u) {
            part_ml[pi] = vec2<f32>(m_run, l_run);
        }
    }
}

// Merges the key splits of one query row: M = max m_s, L = sum l_s e^(m_s - M),
// O = sum O_s e^(m_s - M) / L. Splits without a valid key (l = 0) are skipped.
@compute @workgroup_size(WG)
fn attention_merge(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = linear_workgroup(wid, nwg);
    if (g >= p.bh * p.m) {
        return;
    }
    let bh = g / p.m;
    let i = g % p.m;
    let bi = bh / p.hq;
    let h = bh % p.hq;
    let base = g * p.splits;
    var big_m = SENTINEL;
    for (var s = 0u; s < p.splits; s++) {
        let ml = part_ml[base + s];
        if (ml.y > 0.0) {
            big_m = max(big_m, ml.x);
        }
    }
    var big_l = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        let ml = part_ml[base + s];
        if (ml.y > 0.0) {
            big_l += ml.y * exp(ml.x - big_m);
        }
    }
    var inv = 0.0;
    if (big_l > 0.0) {
        inv = 1.0 / big_l;
    }
    let o_base = bi * p.o_batch + h * p.o_head + i * p.o_row;
    for (var col = lid; col < p.dv; col += WG) {
        var o = 0.0;
        for (var s = 0u; s < p.splits; s++) {
            let ml = part_ml[base + s];
            if (ml.y > 0.0) {
                o += part_o[(base + s) * p.dv + col] * exp(ml.x - big_m);
            }
        }
        out[o_base + col] = elem(o * inv);
    }
    if (has(FLAG_LSE) && lid == 0u) {
        write_lse(g, big_m, big_l);
    }
}

// C = A B^T with A [m, d] (binding q, row stride q_row) and B [n, d] (binding k, row stride
// k_row), or with FLAG_MATMUL_NN C = A B with B [d, n] (binding v, row stride v_row); C [m, n]
// (binding out, row stride o_row). One 64 x 64 block of C a workgroup, on gemm.wgsl's block
// products, as the register-blocked attention below.
@compute @workgroup_size(GEMM_WG)
fn matmul(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = linear_workgroup(wid, nwg);
    if (g >= p.qtiles * p.ntiles) {
        return;
    }
    let m0 = (g / p.ntiles) * GEMM_BLOCK;
    let n0 = (g % p.ntiles) * GEMM_BLOCK;
    base_q = 0u;
    base_k = 0u;
    base_v = 0u;
    let nn = has(FLAG_MATMUL_NN);
    var acc = gemm_zero();
    gemm_product(&acc, SRC_Q, select(SRC_K, SRC_V, nn), m0, p.m, n0, p.n, p.d, false, nn, lid);
    let row0 = m0 + gemm_row(lid);
    let col = n0 + gemm_col(lid);
    for (var r = 0u; r < 4u; r++) {
        let row = row0 + r;
        if (row < p.m) {
            store4(row * p.o_row, col, p.n, acc[r]);
        }
    }
}

// ---- register-blocked attention: 64 query rows a workgroup, 64 keys a step ----
// The block products of shaders/gemm.wgsl (GEMM_WG invocations, each a 4 x 4 micro-block):
// S = Q K^T of a 64 x 64 block, then O += P V, 64 output columns (a slab) at a time. The
// invocation with rows r0 .. r0 + 3 (r0 = gemm_row) and columns c0 .. c0 + 3 holds those
// scores and probabilities, and the same rows of its columns of every output slab. Row maxima
// and sums over a block's 64 keys meet in workgroup memory; the running sum stays a partial
// per invocation (every invocation of a row scales by the same factor) and is added up once.
// Used for calls without key splits; `attention` above serves the others.

const SRC_NONE: u32 = 3u;   // stages nothing (zeros)

var<private> base_q: u32;
var<private> base_k: u32;
var<private> base_v: u32;   // of the current key block's first row

// Two uses at different times, so one array (workgroup memory stays under 16 KiB): the P of
// one depth step as the left factor, laid out as gemm.wgsl's staged rows; and the partials of
// each invocation's four rows (maxima, -inf for no valid score, then sums), invocation
// (ty, tx)'s at [tx * 16 + ty]. Barriers separate the uses: the block products begin with one.
var<workgroup> stage_p: array<vec4<f32>, GEMM_BK * GEMM_LD>;
// The last key block (counted from 1) with a key hidden from one of the workgroup's rows. It
// only grows, so it needs no reset between blocks (only at the start: workgroup memory is not
// zeroed); a block whose number it holds multiplies P V the careful way.
var<workgroup> hidden_in: atomic<u32>;

fn gemm_a(src: u32, m: u32, k: u32) -> f32 {
    if (src == SRC_Q) {
        return f32(q[base_q + m * p.q_row + k]);
    }
    return 0.0;
}

fn gemm_b(src: u32, depth: u32, n: u32) -> f32 {
    if (src == SRC_K) {
        return f32(k[base_k + n * p.k_row + depth]);
    }
    return f32(v[base_v + depth * p.v_row + n]);
}

// x into columns col .. col + 3 of the output row at `base`, those below `cols`.
fn store4(base: u32, col: u32, cols: u32, x: vec4<f32>) {
    if (col < cols) { out[base + col] = elem(x.x); }
    if (col + 1u < cols) { out[base + col + 1u] = elem(x.y); }
    if (col + 2u < cols) { out[base + col + 2u] = elem(x.z); }
    if (col + 3u < cols) { out[base + col + 3u] = elem(x.w); }
}

// The score of (query i, key j) of a batch of nb keys and whether it is visible, from its dot
// product.
fn block_score(bi: u32, nb: u32, h: u32, i: u32, j: u32, dot: f32) -> vec2<f32> {
    if (visible(bi, nb, h, i, j)) {
        return vec2(score(dot) + mask_term(bi, h, i, j), 1.0);
    }
    return vec2(0.0, 0.0);
}

@compute @workgroup_size(GEMM_WG)
fn attention_blocked(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = linear_workgroup(wid, nwg);
    let qt = g % p.qtiles;
    let bh = g / p.qtiles;
    if (bh >= p.bh) {
        return;
    }
    let bi = bh / p.hq;
    let h = bh % p.hq;
    let hk = h / p.group;
    let q0 = qt * GEMM_BLOCK;
    let ty = lid / 16u;
    let tx = lid % 16u;
    let r0 = gemm_row(lid);
    let c0 = gemm_col(lid);
    base_q = bi * p.q_batch + h * p.q_head;
    base_k = bi * p.k_batch + hk * p.k_head;
    let v_head = bi * p.v_batch + hk * p.v_head;

    // This batch's keys: blocks past them are never visited.
    let nb = batch_keys(bi);
    var kend = nb;
    if (has(FLAG_CAUSAL)) {
        let lim = i32(q0 + GEMM_BLOCK) + i32(nb) - i32(p.m);
        kend = u32(clamp(lim, 0, i32(nb)));
    }

    var m_run = vec4(SENTINEL);
    var seen = vec4<bool>(false);
    var l_part = vec4(0.0);
    var o: array<array<vec4<f32>, 4>, SLABS>;
    for (var sl = 0u; sl < SLABS; sl++) {
        o[sl] = gemm_zero();
    }
    if (lid == 0u) {
        atomicStore(&hidden_in, 0u); // before the block product's first barrier
    }
    for (var j0 = 0u; j0 < kend; j0 += GEMM_BLOCK) {
        var s = gemm_zero();
        gemm_product(&s, SRC_Q, SRC_K, q0, p.m, j0, kend, p.d, false, false, lid);

        // Scores, validity and this invocation's row maxima.
        var sc: array<vec4<f32>, 4>;
        var ok: array<vec4<f32>, 4>;
        // Whether a key of the block is hidden from one of these rows: its p is then 0 and
        // its value (perhaps junk, a masked cache slot) must not be multiplied in. Keys past
        // kend are staged as zeros and rows past m are not stored, so neither counts.
        var hides_mine = false;
        var pbits = vec4(NEG_INF_BITS);
        let kcount = min(GEMM_BLOCK, kend - j0);
        let in_call = vec4(j0 + c0) + vec4(0u, 1u, 2u, 3u) < vec4(kend);
        for (var r = 0u; r < 4u; r++) {
            let i = q0 + r0 + r;
            let j = j0 + c0;
            let a = block_score(bi, nb, h, i, j, s[r].x);
            let b = block_score(bi, nb, h, i, j + 1u, s[r].y);
            let c = block_score(bi, nb, h, i, j + 2u, s[r].z);
            let d = block_score(bi, nb, h, i, j + 3u, s[r].w);
            sc[r] = vec4(a.x, b.x, c.x, d.x);
            ok[r] = vec4(a.y, b.y, c.y, d.y);
            var mx = SENTINEL;
            var some = false;
            if (a.y > 0.0) { mx = max(mx, a.x); some = true; }
            if (b.y > 0.0) { mx = max(mx, b.x); some = true; }
            if (c.y > 0.0) { mx = max(mx, c.x); some = true; }
            if (d.y > 0.0) { mx = max(mx, d.x); some = true; }
            var bits = NEG_INF_BITS;
            if (some) {
                bits = bitcast<u32>(mx);
            }
            pbits[r] = bits;
            if (i < p.m && any(in_call & (ok[r] == vec4(0.0)))) {
                hides_mine = true;
            }
        }
        let block = j0 / GEMM_BLOCK + 1u;
        if (hides_mine) {
            atomicMax(&hidden_in, block);
        }
        stage_p[tx * 16u + ty] = bitcast<vec4<f32>>(pbits);
        workgroupBarrier();
        // The same for every invocation: the whole workgroup takes one path below.
        let hides = atomicLoad(&hidden_in) == block;
        var mx4 = vec4(SENTINEL);
        var any4 = vec4<bool>(false);
        for (var t = 0u; t < 16u; t++) {
            let x = stage_p[t * 16u + ty];
            let valid = bitcast<vec4<u32>>(x) != vec4(NEG_INF_BITS);
            mx4 = max(mx4, select(vec4(SENTINEL), x, valid));
            any4 = any4 | valid;
        }
        var alpha = vec4(0.0);
        for (var r = 0u; r < 4u; r++) {
            let m_new = max(m_run[r], mx4[r]);
            if (seen[r]) {
                alpha[r] = exp(m_run[r] - m_new);
            }
            if (any4[r]) {
                seen[r] = true;
                m_run[r] = m_new;
            }
        }
        // Probabilities (0 where hidden, with exp only of valid scores) and partial sums.
        var pr: array<vec4<f32>, 4>;
        for (var r = 0u; r < 4u; r++) {
            let valid = ok[r] > vec4(0.0);
            let e = exp(select(vec4(0.0), sc[r] - vec4(m_run[r]), valid));
            pr[r] = select(vec4(0.0), e, valid);
            l_part[r] = alpha[r] * l_part[r] + pr[r].x + pr[r].y + pr[r].z + pr[r].w;
        }
        for (var sl = 0u; sl < SLABS; sl++) {
            for (var r = 0u; r < 4u; r++) {
                o[sl][r] *= alpha[r];
            }
        }

        // O += P V, a slab of 64 value columns at a time, GEMM_BK keys a step.
        base_v = v_head + j0 * p.v_row;
        for (var sl = 0u; sl < SLABS; sl++) {
            for (var k0 = 0u; k0 < kcount; k0 += GEMM_BK) {
                workgroupBarrier();
                // The invocations holding these keys stage P, one key (column) a vec4 of rows.
                if (c0 >= k0 && c0 < k0 + GEMM_BK) {
                    let at = (c0 - k0) * GEMM_LD + ty;
                    stage_p[at] = vec4(pr[0].x, pr[1].x, pr[2].x, pr[3].x);
                    stage_p[at + GEMM_LD] = vec4(pr[0].y, pr[1].y, pr[2].y, pr[3].y);
                    stage_p[at + 2u * GEMM_LD] = vec4(pr[0].z, pr[1].z, pr[2].z, pr[3].z);
                    stage_p[at + 3u * GEMM_LD] = vec4(pr[0].w, pr[1].w, pr[2].w, pr[3].w);
                }
                gemm_stage(SRC_NONE, SRC_V, 0u, GEMM_BLOCK, sl * GEMM_BLOCK, p.dv, k0, kcount,
                           false, true, lid);
                workgroupBarrier();
                var acc = o[sl];
                for (var kk = 0u; kk < GEMM_BK; kk++) {
                    let a = stage_p[kk * GEMM_LD + ty];
                    let b = gemm_bs[kk * GEMM_LD + tx];
                    if (hides) {
                        // p = 0 leaves the sum alone, whatever the value.
                        acc[0] = select(acc[0], fma(vec4(a.x), b, acc[0]), a.x != 0.0);
                        acc[1] = select(acc[1], fma(vec4(a.y), b, acc[1]), a.y != 0.0);
                        acc[2] = select(acc[2], fma(vec4(a.z), b, acc[2]), a.z != 0.0);
                        acc[3] = select(acc[3], fma(vec4(a.w), b, acc[3]), a.w != 0.0);
                    } else {
                        acc[0] = fma(vec4(a.x), b, acc[0]);
                        acc[1] = fma(vec4(a.y), b, acc[1]);
                        acc[2] = fma(vec4(a.z), b, acc[2]);
                        acc[3] = fma(vec4(a.w), b, acc[3]);
                    }
                }
                o[sl] = acc;
            }
        }
    }

    // Row sums: the 16 partials of each row.
    workgroupBarrier();
    stage_p[tx * 16u + ty] = l_part;
    workgroupBarrier();
    var l4 = vec4(0.0);
    for (var t = 0u; t < 16u; t++) {
        l4 += stage_p[t * 16u + ty];
    }
    for (var r = 0u; r < 4u; r++) {
        let i = q0 + r0 + r;
        if (i >= p.m) {
            continue;
        }
        var l = 0.0;
        if (seen[r]) {
            l = l4[r];
        }
        var inv = 0.0;
        if (l > 0.0) {
            inv = 1.0 / l;
        }
        let o_base = bi * p.o_batch + h * p.o_head + i * p.o_row;
        for (var sl = 0u; sl < SLABS; sl++) {
            let col = sl * GEMM_BLOCK + c0;
            store4(o_base, col, p.dv, o[sl][r] * inv);
        }
        if (has(FLAG_LSE) && tx == 0u) {
            write_lse(bh * p.m + i, m_run[r], l);
        }
    }
}
