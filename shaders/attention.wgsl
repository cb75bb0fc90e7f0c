// Exact attention, FlashAttention-2 style, and the plain matmul of the same tile engine.
//
// Prepended by the host: `alias elem = f32|f16;`, `const D/DV/T/WG` lines, shaders/grid.wgsl
// and shaders/tiles.wgsl. One workgroup per (batch, head, query tile[, key split]); Q is staged
// once, K and V tiles stream through workgroup memory; each invocation owns one query row of
// the tile and ACC of its output columns, with the row's running max m, running sum l and the
// unnormalised accumulator in registers.
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

var<workgroup> tile_s: array<f32, T * T>;  // scores of the current key tile
var<workgroup> tile_f: array<u32, T * T>;  // 1 where the score is valid

const SRC_Q: u32 = 0u;
const SRC_K: u32 = 1u;
const SRC_V: u32 = 2u;

fn tile_read(src: u32, i: u32) -> f32 {
    switch src {
        case SRC_Q: { return f32(q[i]); }
        case SRC_K: { return f32(k[i]); }
        default: { return f32(v[i]); }
    }
}

fn has(flag: u32) -> bool {
    return (p.flags & flag) != 0u;
}

fn mask_index(bi: u32, h: u32, i: u32, j: u32) -> u32 {
    return bi * p.mask_batch + h * p.mask_head + i * p.mask_row + j;
}

// Whether query i of (batch bi, head h) may attend key j. An additive -inf is compared as
// bits, so no infinity enters the arithmetic.
fn visible(bi: u32, h: u32, i: u32, j: u32) -> bool {
    if (i >= p.m || j >= p.n) {
        return false;
    }
    // Bottom-right causal alignment: j <= i + (n - m).
    if (has(FLAG_CAUSAL) && i32(j) > i32(i) + i32(p.n) - i32(p.m)) {
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

// (P V)[r, col] over the keys row r may see. A hidden key's p = 0 is not enough: 0 times a
// non-finite value (junk in a masked slot of a KV cache) is NaN.
fn pv_visible(r: u32, col: u32) -> f32 {
    var s = 0.0;
    for (var j = 0u; j < T; j++) {
        if (tile_f[r * T + j] != 0u) {
            s = fma(tile_p[r * T + j], tile_v[j * DV + col], s);
        }
    }
    return s;
}

@compute @workgroup_size(WG)
fn attention(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = linear_workgroup(wid, nwg);
    let split = g % p.splits;
    let rest = g / p.splits;
    let qt = rest % p.qtiles;
    let bh = rest / p.qtiles;
    if (bh >= p.bh) {
        return;
    }
    let bi = bh / p.hq;
    let h = bh % p.hq;
    let hk = h / p.group;
    let q0 = qt * T;
    let r = lid / C;
    let cg = lid % C;
    let i = q0 + r;

    tile_load_a(SRC_Q, bi * p.q_batch + h * p.q_head, p.q_row, q0, p.m, p.d, lid);
    let k_base = bi * p.k_batch + hk * p.k_head;
    let v_base = bi * p.v_batch + hk * p.v_head;

    // Keys of this split; under causality none past the tile's last visible key, so the
    // upper triangle's tiles are never loaded.
    let kbegin = split * p.chunk;
    var kend = min(p.n, kbegin + p.chunk);
    if (has(FLAG_CAUSAL)) {
        let lim = i32(q0 + T) + i32(p.n) - i32(p.m);
        kend = min(kend, u32(clamp(lim, 0, i32(p.n))));
    }

    var m_run = SENTINEL;
    var l_run = 0.0;
    var acc: array<f32, ACC>;
    for (var c = 0u; c < ACC; c++) {
        acc[c] = 0.0;
    }
    for (var j0 = kbegin; j0 < kend; j0 += T) {
        // The previous tile's readers are done (and tile_a is visible on the first pass).
        workgroupBarrier();
        tile_load_b(SRC_K, k_base, p.k_row, j0, p.n, p.d, lid);
        tile_load_v(SRC_V, v_base, p.v_row, j0, p.n, p.dv, lid);
        workgroupBarrier();
        for (var e = lid; e < T * T; e += WG) {
            let rr = e / T;
            let cc = e % T;
            var s = 0.0;
            var ok = 0u;
            if (visible(bi, h, q0 + rr, j0 + cc)) {
                s = score(tile_dot_ab(rr, cc, p.d)) + mask_term(bi, h, q0 + rr, j0 + cc);
                ok = 1u;
            }
            tile_s[e] = s;
            tile_f[e] = ok;
        }
        workgroupBarrier();
        // Row max over the valid scores (each invocation of the row, redundantly), and
        // whether the row sees every real key of the tile.
        var m_new = m_run;
        var sees_all = true;
        for (var c = 0u; c < T; c++) {
            if (tile_f[r * T + c] != 0u) {
                m_new = max(m_new, tile_s[r * T + c]);
            } else if (j0 + c < p.n) {
                sees_all = false;
            }
        }
        for (var c = cg; c < T; c += C) {
            var pr = 0.0;
            if (tile_f[r * T + c] != 0u) {
                pr = exp(tile_s[r * T + c] - m_new);
            }
            tile_p[r * T + c] = pr;
        }
        workgroupBarrier();
        var alpha = 0.0;
        if (l_run > 0.0) {
            alpha = exp(m_run - m_new);
        }
        var rowsum = 0.0;
        for (var c = 0u; c < T; c++) {
            rowsum += tile_p[r * T + c];
        }
        l_run = alpha * l_run + rowsum;
        m_run = m_new;
        for (var c = 0u; c < ACC; c++) {
            var pv: f32;
            if (sees_all) {
                pv = tile_pv(r, cg + c * C);
            } else {
                pv = pv_visible(r, cg + c * C);
            }
            acc[c] = fma(alpha, acc[c], pv);
        }
    }

    if (i >= p.m) {
        return;
    }
    if (p.splits == 1u) {
        var inv = 0.0;
        if (l_run > 0.0) {
            inv = 1.0 / l_run;
        }
        let o_base = bi * p.o_batch + h * p.o_head + i * p.o_row;
        for (var c = 0u; c < ACC; c++) {
            let col = cg + c * C;
            if (col < p.dv) {
                out[o_base + col] = elem(acc[c] * inv);
            }
        }
        if (has(FLAG_LSE) && cg == 0u) {
            write_lse(bh * p.m + i, m_run, l_run);
        }
    } else {
        let pi = (bh * p.m + i) * p.splits + split;
        for (var c = 0u; c < ACC; c++) {
            let col = cg + c * C;
            if (col < p.dv) {
                part_o[pi * p.dv + col] = acc[c];
            }
        }
        if (cg == 0u) {
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
// k_row), C [m, n] (binding out, row stride o_row): T x T output tiles, depth in chunks of D.
@compute @workgroup_size(WG)
fn matmul(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = linear_workgroup(wid, nwg);
    if (g >= p.qtiles * p.ntiles) {
        return;
    }
    let ti = g / p.ntiles;
    let tj = g % p.ntiles;
    var acc: array<f32, EPT>;
    for (var e = 0u; e < EPT; e++) {
        acc[e] = 0.0;
    }
    for (var k0 = 0u; k0 < p.d; k0 += D) {
        workgroupBarrier();
        tile_load_a(SRC_Q, k0, p.q_row, ti * T, p.m, p.d - k0, lid);
        tile_load_b(SRC_K, k0, p.k_row, tj * T, p.n, p.d - k0, lid);
        workgroupBarrier();
        for (var e = 0u; e < EPT; e++) {
            let x = lid + e * WG;
            if (x < T * T) {
                acc[e] += tile_dot_ab(x / T, x % T, D);
            }
        }
    }
    for (var e = 0u; e < EPT; e++) {
        let x = lid + e * WG;
        let row = ti * T + x / T;
        let col = tj * T + x % T;
        if (x < T * T && row < p.m && col < p.n) {
            out[row * p.o_row + col] = elem(acc[e]);
        }
    }
}

// C = A B with A [m, d] (binding q) and B [d, n] (binding v, row stride v_row), C [m, n]:
// output tiles of T rows by DV columns, depth in chunks of T through tile_p and tile_v.
@compute @workgroup_size(WG)
fn matmul_nn(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = linear_workgroup(wid, nwg);
    if (g >= p.qtiles * p.ntiles) {
        return;
    }
    let ti = g / p.ntiles;
    let tj = g % p.ntiles;
    let r = lid / C;
    let cg = lid % C;
    var acc: array<f32, ACC>;
    for (var c = 0u; c < ACC; c++) {
        acc[c] = 0.0;
    }
    for (var k0 = 0u; k0 < p.d; k0 += T) {
        workgroupBarrier();
        tile_load_p(SRC_Q, k0, p.q_row, ti * T, p.m, p.d - k0, lid);
        tile_load_v(SRC_V, tj * DV, p.v_row, k0, p.d, p.n - tj * DV, lid);
        workgroupBarrier();
        for (var c = 0u; c < ACC; c++) {
            acc[c] += tile_pv(r, cg + c * C);
        }
    }
    let row = ti * T + r;
    for (var c = 0u; c < ACC; c++) {
        let col = tj * DV + cg + c * C;
        if (row < p.m && col < p.n) {
            out[row * p.o_row + col] = elem(acc[c]);
        }
    }
}
