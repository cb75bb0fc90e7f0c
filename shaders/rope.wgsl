// RoPE family: rotary position embedding of q (and, fused in the same dispatch, k with its own
// head count), styles half (NeoX / Llama) and interleaved (RoFormer / GPT-J), partial rotary
// dim, bshd / bhsd layouts with arbitrary row strides, in place or out of place.
//
// Prepended by the host: `const STORAGE: u32 = 0u | 1u | 2u;` (f32, f16 packed two per u32,
// bf16 packed two per u32) and shaders/grid.wgsl.
//
// Every buffer is an array<u32>: f32 values are bitcast, 16-bit values stay packed, so
// pass-through features are copied as bits and stay bit-identical. The angles never reach the
// device: the host computes cos and sin of each (position, frequency) in f64 (exact reduction
// mod 2 pi), folds in mscale and the sign of the inverse, and uploads them as `table`.
//
// Work split. Invocation g of the grid owns one "unit" of one row (a row is the d features of
// one (batch, token, head)); units never share a 32-bit word, so invocations never race:
//   f32:                 unit = one rotation pair, then one unit per pass-through feature;
//   16-bit, interleaved: unit = one word (= one pair), then one per pass-through word;
//   16-bit, half, r%4=0: unit = word j of the first half + word j + r/4 of the second half
//                        (two pairs), then one per pass-through word;
//   16-bit otherwise:    unit = the whole row (PER_ROW), one invocation per row.
// Pass-through units exist only out of place (in place they are left untouched).

override WG: u32 = 256u;

const F32: u32 = 0u;
const F16: u32 = 1u;
const BF16: u32 = 2u;

const FLAG_INTERLEAVED: u32 = 1u;
const FLAG_BHSD: u32 = 2u;
const FLAG_IN_PLACE: u32 = 4u;
const FLAG_PER_ROW: u32 = 8u;
const FLAG_BATCH_POSITIONS: u32 = 16u;

// One rotated tensor (q or k). Offsets and strides in elements; the feature axis is contiguous.
struct Target {
    rows: u32,      // batch * seq * heads
    heads: u32,
    src_off: u32,
    src_sb: u32,    // stride of axis 0 (batch)
    src_s1: u32,    // stride of axis 1 (seq for bshd, heads for bhsd)
    src_s2: u32,    // stride of axis 2 (heads for bshd, seq for bhsd)
    dst_off: u32,
    dst_sb: u32,
    dst_s1: u32,
    dst_s2: u32,
    _pad0: u32,
    _pad1: u32,
}

struct Params {
    q: Target,
    k: Target,
    seq: u32,       // tokens per sequence
    d: u32,         // features per row
    r: u32,         // rotary features (even, <= d)
    units: u32,     // units per row
    flags: u32,
    table_off: u32, // first table pair of this dispatch (batch chunks with [b, s] positions)
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> q_src: array<u32>;
@group(0) @binding(1) var<storage, read_write> q_dst: array<u32>;
@group(0) @binding(2) var<storage, read_write> k_src: array<u32>;
@group(0) @binding(3) var<storage, read_write> k_dst: array<u32>;
@group(0) @binding(4) var<storage, read> table: array<vec2<f32>>; // [position rows, r/2] (cos, sin)
@group(0) @binding(5) var<uniform> p: Params;

fn has(flag: u32) -> bool {
    return (p.flags & flag) != 0u;
}

fn load(which: u32, i: u32) -> u32 {
    if (which == 0u) {
        return q_src[i];
    }
    return k_src[i];
}

fn store(which: u32, i: u32, v: u32) {
    if (which == 0u) {
        q_dst[i] = v;
    } else {
        k_dst[i] = v;
    }
}

// Destination word, for read-modify-write of one half (PER_ROW only; one invocation owns it).
fn load_dst(which: u32, i: u32) -> u32 {
    if (which == 0u) {
        return q_dst[i];
    }
    return k_dst[i];
}

// ---- 16-bit conversions: two values per word, element 2w in the low half ----

fn bf16_bits(v: f32) -> u32 {
    let u = bitcast<u32>(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u >> 16u) | 0x40u; // NaN stays a (quiet) NaN
    }
    // Round to nearest, ties to even.
    return (u + 0x7fffu + ((u >> 16u) & 1u)) >> 16u;
}

fn unpack_word(w: u32) -> vec2<f32> {
    if (STORAGE == F16) {
        return unpack2x16float(w);
    }
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

fn pack_word(v: vec2<f32>) -> u32 {
    if (STORAGE == F16) {
        return pack2x16float(v);
    }
    return bf16_bits(v.x) | (bf16_bits(v.y) << 16u);
}

fn half_to_f32(h: u32) -> f32 {
    if (STORAGE == F16) {
        return unpack2x16float(h).x;
    }
    return bitcast<f32>(h << 16u);
}

fn f32_to_half(v: f32) -> u32 {
    if (STORAGE == F16) {
        return pack2x16float(vec2<f32>(v, 0.0)) & 0xffffu;
    }
    return bf16_bits(v);
}

// Element e of a 16-bit buffer (e counts elements; words hold two).
fn load_half(which: u32, e: u32) -> f32 {
    return half_to_f32((load(which, e >> 1u) >> ((e & 1u) * 16u)) & 0xffffu);
}

fn store_half(which: u32, e: u32, v: f32) {
    let w = e >> 1u;
    let shift = (e & 1u) * 16u;
    let old = load_dst(which, w) & ~(0xffffu << shift);
    store(which, w, old | (f32_to_half(v) << shift));
}

// (a, b) -> (a c - b s, a s + b c); cs = (c, s) with mscale and the inverse's sign folded in.
fn rotate(a: f32, b: f32, cs: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(a * cs.x - b * cs.y, a * cs.y + b * cs.x);
}

// Pair i's partner indices within a row.
fn pair_index(i: u32) -> vec2<u32> {
    if (has(FLAG_INTERLEAVED)) {
        return vec2<u32>(2u * i, 2u * i + 1u);
    }
    return vec2<u32>(i, i + p.r / 2u);
}

@compute @workgroup_size(WG)
fn rope(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var g = linear_workgroup(wid, nwg) * WG + lid;
    var which = 0u;
    var t = p.q;
    let nq = p.q.rows * p.units;
    if (g >= nq) {
        g -= nq;
        which = 1u;
        t = p.k;
        if (g >= p.k.rows * p.units) {
            return;
        }
    }
    let row = g / p.units;
    let u = g % p.units;
    // Row -> (batch, token, head).
    var tok: u32;
    var head: u32;
    var a1: u32;
    var a2: u32;
    var batch: u32;
    if (has(FLAG_BHSD)) {
        tok = row % p.seq;
        head = (row / p.seq) % t.heads;
        batch = row / (p.seq * t.heads);
        a1 = head;
        a2 = tok;
    } else {
        head = row % t.heads;
        tok = (row / t.heads) % p.seq;
        batch = row / (p.seq * t.heads);
        a1 = tok;
        a2 = head;
    }
    let sbase = t.src_off + batch * t.src_sb + a1 * t.src_s1 + a2 * t.src_s2;
    let dbase = t.dst_off + batch * t.dst_sb + a1 * t.dst_s1 + a2 * t.dst_s2;
    // `batch` counts from this dispatch's first batch, and so does `table_off`.
    var prow = tok;
    if (has(FLAG_BATCH_POSITIONS)) {
        prow = batch * p.seq + tok;
    }
    let half_r = p.r / 2u;
    let tbase = p.table_off + prow * half_r;

    if (STORAGE == F32) {
        if (u < half_r) {
            let ij = pair_index(u);
            let v = rotate(
                bitcast<f32>(load(which, sbase + ij.x)),
                bitcast<f32>(load(which, sbase + ij.y)),
                table[tbase + u],
            );
            store(which, dbase + ij.x, bitcast<u32>(v.x));
            store(which, dbase + ij.y, bitcast<u32>(v.y));
        } else {
            let j = p.r + (u - half_r);
            store(which, dbase + j, load(which, sbase + j));
        }
        return;
    }

    // 16-bit storage: rows start on whole words (the host checks offsets and strides are even).
    let sw = sbase >> 1u;
    let dw = dbase >> 1u;
    if (has(FLAG_PER_ROW)) {
        for (var i = 0u; i < half_r; i++) {
            let ij = pair_index(i);
            let v = rotate(load_half(which, sbase + ij.x), load_half(which, sbase + ij.y), table[tbase + i]);
            store_half(which, dbase + ij.x, v.x);
            store_half(which, dbase + ij.y, v.y);
        }
        if (!has(FLAG_IN_PLACE)) {
            for (var w = half_r; w < p.d / 2u; w++) {
                store(which, dw + w, load(which, sw + w));
            }
        }
        return;
    }
    if (has(FLAG_INTERLEAVED)) {
        if (u < half_r) {
            let x = unpack_word(load(which, sw + u));
            store(which, dw + u, pack_word(rotate(x.x, x.y, table[tbase + u])));
        } else {
            let w = half_r + (u - half_r);
            store(which, dw + w, load(which, sw + w));
        }
        return;
    }
    // Half style, r % 4 == 0: words u (pairs 2u, 2u+1) and u + r/4 (their partners).
    let quarter = p.r / 4u;
    if (u < quarter) {
        let a = unpack_word(load(which, sw + u));
        let b = unpack_word(load(which, sw + u + quarter));
        let v0 = rotate(a.x, b.x, table[tbase + 2u * u]);
        let v1 = rotate(a.y, b.y, table[tbase + 2u * u + 1u]);
        store(which, dw + u, pack_word(vec2<f32>(v0.x, v1.x)));
        store(which, dw + u + quarter, pack_word(vec2<f32>(v0.y, v1.y)));
    } else {
        let w = half_r + (u - quarter);
        store(which, dw + w, load(which, sw + w));
    }
}
