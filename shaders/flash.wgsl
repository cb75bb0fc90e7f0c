// FLASH mixed-chunk attention (GAU): quadratic attention inside chunks plus linear attention
// across chunks, in three passes over the tile engine.
//
// Prepended by the host: `alias elem = f32|f16;`, `const D/DV/T/WG` lines (DV == WG),
// shaders/grid.wgsl and shaders/tiles.wgsl.
//   flash_kv    one workgroup per (batch, chunk, 16 rows of s, DV columns of e):
//               KV_g = kl_g^T v_g over the chunk's valid keys, and the chunk's valid-key count.
//   flash_scan  one invocation per (batch, KV element or count): the exclusive prefix over
//               chunks in place (slot g = state + sum_{h<g} KV_h, slot G = state + all), and,
//               when decoding, the new state.
//   flash_out   one workgroup per (batch, chunk, T query rows, DV columns of e):
//               Ylin = z ql (KV slot), then Yquad = f(kappa qq kq^T + bias) v over the chunk's
//               key tiles (causal: none past the diagonal), gate, write.
// Masked and padded keys contribute nothing: their v rows are zeroed before KV, and their
// scores are never passed to the activation. Positions of fused RoPE come from a host
// (cos, sin) table (the RoPE family's), indexed by row.

struct Params {
    n: u32, s: u32, e: u32, chunk: u32,
    groups: u32, sblocks: u32, eblocks: u32, qtiles: u32,
    batch: u32, row_begin: u32, flags: u32, norm: u32,
    kappa: f32, lin_scale: f32, rope_base: u32, count_base: u32,
}

const FLAG_CAUSAL: u32 = 1u;
const FLAG_GATE: u32 = 2u;
const FLAG_BIAS: u32 = 4u;
const FLAG_MASK: u32 = 8u;
const FLAG_ROPE: u32 = 16u;
const FLAG_LAPLACE: u32 = 32u;
const FLAG_UPDATE_STATE: u32 = 64u;

// How z is found: the constant lin_scale, 1 / (all valid keys), or 1 / (keys in the prefix).
const NORM_CONSTANT: u32 = 0u;
const NORM_LENGTH: u32 = 1u;
const NORM_PREFIX: u32 = 2u;

// Rows of s per flash_kv workgroup (accumulators per invocation).
const SB: u32 = 16u;

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
// [batch, G + 1, s, e] KV slots, then [batch, G + 1] valid-key counts (from count_base),
// then the (cos, sin) table [n, s / 2] (from rope_base).
@group(0) @binding(10) var<storage, read_write> kv: array<f32>;
// Decoding state: [batch, s, e] sum of KV over completed chunks, then [batch] counts.
@group(0) @binding(11) var<storage, read_write> state: array<f32>;

const SRC_QQ: u32 = 0u;
const SRC_KQ: u32 = 1u;
const SRC_QL: u32 = 2u;
const SRC_KL: u32 = 3u;
const SRC_V: u32 = 4u;
const SRC_KV: u32 = 5u;

fn tile_read(src: u32, i: u32) -> f32 {
    switch src {
        case SRC_QQ: { return f32(qq[i]); }
        case SRC_KQ: { return f32(kq[i]); }
        case SRC_QL: { return f32(ql[i]); }
        case SRC_KL: { return f32(kl[i]); }
        case SRC_V: { return f32(v[i]); }
        default: { return kv[i]; }
    }
}

fn has(flag: u32) -> bool {
    return (p.flags & flag) != 0u;
}

// Key j of batch bi exists and is not masked.
fn key_ok(bi: u32, j: u32) -> bool {
    if (j >= p.n) {
        return false;
    }
    if (has(FLAG_MASK)) {
        let e = bi * p.n + j;
        return ((key_mask[e >> 2u] >> ((e & 3u) * 8u)) & 0xffu) != 0u;
    }
    return true;
}

// Rotates the rows of tile_a (which = 0) or tile_b (which = 1) that start at sequence row
// row0 by their positions, half style: pairs (i, i + s/2). Call between barriers.
fn rotate_tile(which: u32, row0: u32, lid: u32) {
    let h = p.s / 2u;
    for (var x = lid; x < T * h; x += WG) {
        let r = x / h;
        let i = x % h;
        let t = row0 + r;
        if (t < p.n) {
            let at = p.rope_base + 2u * (t * h + i);
            let c = kv[at];
            let sn = kv[at + 1u];
            let ia = r * D + i;
            let ib = ia + h;
            if (which == 0u) {
                let a = tile_a[ia];
                let b = tile_a[ib];
                tile_a[ia] = a * c - b * sn;
                tile_a[ib] = a * sn + b * c;
            } else {
                let a = tile_b[ia];
                let b = tile_b[ib];
                tile_b[ia] = a * c - b * sn;
                tile_b[ib] = a * sn + b * c;
            }
        }
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

@compute @workgroup_size(WG)
fn flash_kv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var w = linear_workgroup(wid, nwg);
    let eb = w % p.eblocks;
    w /= p.eblocks;
    let sb = w % p.sblocks;
    w /= p.sblocks;
    let g = w % p.groups;
    let bi = w / p.groups;
    if (bi >= p.batch) {
        return;
    }
    let row0 = g * p.chunk;
    let rend = min(p.n, row0 + p.chunk);
    let a0 = sb * SB;
    let col0 = eb * DV;
    var acc: array<f32, SB>;
    for (var a = 0u; a < SB; a++) {
        acc[a] = 0.0;
    }
    for (var j0 = row0; j0 < rend; j0 += T) {
        workgroupBarrier();
        tile_load_b(SRC_KL, bi * p.n * p.s, p.s, j0, rend, p.s, lid);
        tile_load_v(SRC_V, bi * p.n * p.e + col0, p.e, j0, rend, p.e - col0, lid);
        workgroupBarrier();
        if (has(FLAG_ROPE)) {
            rotate_tile(1u, j0, lid);
        }
        if (has(FLAG_MASK)) {
            for (var x = lid; x < T * DV; x += WG) {
                if (!key_ok(bi, j0 + x / DV)) {
                    tile_v[x] = 0.0;
                }
            }
        }
        workgroupBarrier();
        for (var a = 0u; a < SB; a++) {
            acc[a] += tile_btv(a0 + a, lid);
        }
    }
    let col = col0 + lid;
    let slot = (bi * (p.groups + 1u) + g) * p.s;
    if (col < p.e) {
        for (var a = 0u; a < SB; a++) {
            if (a0 + a < p.s) {
                kv[(slot + a0 + a) * p.e + col] = acc[a];
            }
        }
    }
    if (sb == 0u && eb == 0u && lid == 0u) {
        var count = 0u;
        for (var j = row0; j < rend; j++) {
            count += u32(key_ok(bi, j));
        }
        kv[p.count_base + bi * (p.groups + 1u) + g] = f32(count);
    }
}

@compute @workgroup_size(WG)
fn flash_scan(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_workgroup(wid, nwg) * WG + lid;
    let per = p.s * p.e;
    let elems = p.batch * per;
    var base: u32;
    var stride: u32;
    var st: u32;
    if (idx < elems) {
        let bi = idx / per;
        base = bi * (p.groups + 1u) * per + idx % per;
        stride = per;
        st = idx;
    } else if (idx < elems + p.batch) {
        let bi = idx - elems;
        base = p.count_base + bi * (p.groups + 1u);
        stride = 1u;
        st = idx;
    } else {
        return;
    }
    var run = state[st];
    for (var g = 0u; g < p.groups; g++) {
        let x = kv[base + g * stride];
        kv[base + g * stride] = run;
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

@compute @workgroup_size(WG)
fn flash_out(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var w = linear_workgroup(wid, nwg);
    let eb = w % p.eblocks;
    w /= p.eblocks;
    let qt = w % p.qtiles;
    w /= p.qtiles;
    let g = w % p.groups;
    let bi = w / p.groups;
    if (bi >= p.batch) {
        return;
    }
    let c0 = g * p.chunk;
    let cend = min(p.n, c0 + p.chunk);
    let q0 = c0 + qt * T;
    // Whole workgroups leave together: past the (partial) chunk, or before the first row wanted.
    if (q0 >= cend || q0 + T <= p.row_begin) {
        return;
    }
    let r = lid / C;
    let cg = lid % C;
    let i = q0 + r;
    let col0 = eb * DV;

    // Linear branch: z ql_i (KV slot), the depth s streamed through tile_v T rows at a time.
    tile_load_a(SRC_QL, bi * p.n * p.s, p.s, q0, cend, p.s, lid);
    workgroupBarrier();
    if (has(FLAG_ROPE)) {
        rotate_tile(0u, q0, lid);
        workgroupBarrier();
    }
    var slot = p.groups;
    if (has(FLAG_CAUSAL)) {
        slot = g;
    }
    let kv_base = (bi * (p.groups + 1u) + slot) * p.s * p.e + col0;
    var lin: array<f32, ACC>;
    for (var c = 0u; c < ACC; c++) {
        lin[c] = 0.0;
    }
    for (var k0 = 0u; k0 < p.s; k0 += T) {
        workgroupBarrier();
        tile_load_v(SRC_KV, kv_base, p.e, k0, p.s, p.e - col0, lid);
        workgroupBarrier();
        for (var c = 0u; c < ACC; c++) {
            lin[c] += tile_av(r, cg + c * C, k0);
        }
    }

    // Quadratic branch over the chunk's key tiles; causal stops at the tile's last row.
    workgroupBarrier();
    tile_load_a(SRC_QQ, bi * p.n * p.s, p.s, q0, cend, p.s, lid);
    workgroupBarrier();
    if (has(FLAG_ROPE)) {
        rotate_tile(0u, q0, lid);
    }
    var kend = cend;
    if (has(FLAG_CAUSAL)) {
        kend = min(cend, q0 + T);
    }
    var acc: array<f32, ACC>;
    for (var c = 0u; c < ACC; c++) {
        acc[c] = 0.0;
    }
    for (var j0 = c0; j0 < kend; j0 += T) {
        workgroupBarrier();
        tile_load_b(SRC_KQ, bi * p.n * p.s, p.s, j0, cend, p.s, lid);
        tile_load_v(SRC_V, bi * p.n * p.e + col0, p.e, j0, cend, p.e - col0, lid);
        workgroupBarrier();
        if (has(FLAG_ROPE)) {
            rotate_tile(1u, j0, lid);
            workgroupBarrier();
        }
        for (var x = lid; x < T * T; x += WG) {
            let qi = q0 + x / T;
            let kj = j0 + x % T;
            var a = 0.0;
            if (qi < cend && key_ok(bi, kj) && kj < cend && (!has(FLAG_CAUSAL) || kj <= qi)) {
                var sc = p.kappa * tile_dot_ab(x / T, x % T, p.s);
                if (has(FLAG_BIAS)) {
                    sc += bias[(qi - c0) * p.chunk + kj - c0];
                }
                // The activation runs on valid scores only: f(bias) != 0 for laplace.
                a = activation(sc);
            }
            tile_p[x] = a;
        }
        workgroupBarrier();
        for (var c = 0u; c < ACC; c++) {
            acc[c] += tile_pv(r, cg + c * C);
        }
    }

    if (i >= cend || i < p.row_begin) {
        return;
    }
    let z = lin_z(bi, slot);
    let rows = p.n - p.row_begin;
    for (var c = 0u; c < ACC; c++) {
        let col = col0 + cg + c * C;
        if (col < p.e) {
            var y = acc[c] + z * lin[c];
            if (has(FLAG_GATE)) {
                y *= f32(gate[(bi * p.n + i) * p.e + col]);
            }
            out[(bi * rows + i - p.row_begin) * p.e + col] = elem(y);
        }
    }
}
