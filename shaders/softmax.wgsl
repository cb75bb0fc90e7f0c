// Softmax family over the last axis: softmax / log-softmax with scale, temperature, boolean
// mask, bottom-right causal alignment and softmax_plus (Su's entropy-invariant scaling).
//
// Prepended by the host: `alias elem = f32|f16;`, `const ITEMS: u32 = k;` (elements per
// invocation held in registers for short rows), shaders/grid.wgsl, and one of
// shaders/reduce_subgroup.wgsl or shaders/reduce_shared.wgsl (`Lanes`, `reduce_max_sum`).
// No infinities are computed: maxima start at a finite sentinel and a count says whether any
// element was valid; -inf outputs of log-softmax are written as bit patterns.

override WG: u32 = 256u;

struct Params {
    rows: u32,         // rows in this binding chunk
    n: u32,            // row length
    m: u32,            // causal: queries per [m, n] matrix
    row_offset: u32,   // causal query index of this chunk's first row (global row mod m)
    alpha: f32,        // scale / temperature
    flags: u32,        // FLAG_*
    tiles: u32,        // long rows: tiles per row
    tile_len: u32,     // long rows: elements per tile
    base: u32,         // element of x and y where this chunk's first row starts in the binding
    mask_base: u32,    // byte of the mask where it starts
}

const FLAG_LOG: u32 = 1u;
const FLAG_MASK: u32 = 2u;
const FLAG_CAUSAL: u32 = 4u;
const FLAG_PLUS: u32 = 8u;
// The lowest finite f32: every finite logit is at least this, so rows whose valid logits all
// lie below -3e38 still find their maximum (a higher sentinel would win the max: 0 / 0).
const SENTINEL: f32 = -0x1.fffffep+127f;
const NEG_INF_BITS: u32 = 0xff800000u;
const LOG_512: f32 = 6.2383246250395077;

@group(0) @binding(0) var<storage, read> x: array<elem>;
@group(0) @binding(1) var<storage, read_write> y: array<elem>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;      // bytes packed 4 per word
@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(4) var<storage, read_write> counts: array<f32>;      // [rows] valid counts
@group(0) @binding(5) var<storage, read_write> partials: array<vec4<f32>>; // [rows*tiles] (m, s, c, _)
@group(0) @binding(6) var<storage, read_write> stats: array<vec4<f32>>;    // [rows] (M, S, C, f)

fn has(flag: u32) -> bool {
    return (p.flags & flag) != 0u;
}

// Whether element j of chunk row r takes part (mask true, inside the causal band).
fn is_valid(r: u32, j: u32) -> bool {
    if (has(FLAG_MASK)) {
        let e = p.mask_base + r * p.n + j;
        if (((mask[e >> 2u] >> ((e & 3u) * 8u)) & 0xffu) == 0u) {
            return false;
        }
    }
    if (has(FLAG_CAUSAL)) {
        // Query i may see key j iff j <= i + (n - m).
        let i = (p.row_offset + r % p.m) % p.m;   // < 2m <= 2^32: no wrap
        return i32(j) <= i32(i) + i32(p.n) - i32(p.m);
    }
    return true;
}

// Logits are alpha * x (alpha = scale / T). The kernel keeps v = sign(alpha) x (exact) and
// applies |alpha| after subtracting the maximum, so rounding alpha * x never costs accuracy.
fn signed(v: elem) -> f32 {
    return select(f32(v), -f32(v), p.alpha < 0.0);
}

// The factor on (v - max) inside exp: |alpha|, times softmax_plus's
// log(max(l, 16)) / log(512) where l is the number of valid entries.
fn exp_scale(count: f32) -> f32 {
    if (!has(FLAG_PLUS)) {
        return abs(p.alpha);
    }
    return abs(p.alpha) * log(max(count, 16.0)) / LOG_512;
}

// Valid entries of row r when no mask is involved (full row, or the causal band).
fn band_count(r: u32) -> f32 {
    if (has(FLAG_CAUSAL)) {
        let i = (p.row_offset + r % p.m) % p.m;   // < 2m <= 2^32: no wrap
        return f32(clamp(i32(i) + i32(p.n) - i32(p.m) + 1, 0, i32(p.n)));
    }
    return f32(p.n);
}

fn write_out(e: u32, v: f32) {
    y[p.base + e] = elem(v);
}

fn write_neg_inf(e: u32) {
    y[p.base + e] = elem(bitcast<f32>(NEG_INF_BITS));
}

// exp of an argument <= 0. Below -200 the result is 0 in f32 anyway; the clamp keeps finite
// arguments below about -2.4e38 (a huge scale) from implementations whose exp returns NaN
// there (llvmpipe's does).
fn exp_nonpos(x: f32) -> f32 {
    return exp(max(x, -200.0));
}

// Output of one element given row statistics: M max, S sum of exp(f (v - M)), C valid count,
// f the exponent scale.
fn emit(e: u32, v: f32, ok: bool, big_m: f32, big_s: f32, c: f32, f: f32) {
    if (has(FLAG_LOG)) {
        if (ok && c > 0.0) {
            write_out(e, f * (v - big_m) - log(big_s));
        } else {
            write_neg_inf(e);
        }
    } else if (ok && c > 0.0) {
        write_out(e, exp_nonpos(f * (v - big_m)) / big_s);
    } else {
        write_out(e, 0.0);
    }
}

// ---- short rows: one workgroup per row, the row held in registers; one read, one write ----
@compute @workgroup_size(WG)
fn softmax_row(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    lanes: Lanes,
) {
    let lid = lanes.lid;
    let r = linear_workgroup(wid, nwg);
    if (r >= p.rows) {
        return;
    }
    let base = r * p.n;
    var vals: array<f32, ITEMS>;
    var valid = 0u;
    var local = vec2<f32>(SENTINEL, 0.0);
    for (var k = 0u; k < ITEMS; k++) {
        let j = lid + k * WG;
        if (j < p.n) {
            let v = signed(x[p.base + base + j]);
            vals[k] = v;
            if (is_valid(r, j)) {
                valid |= 1u << k;
                local = vec2<f32>(max(local.x, v), local.y + 1.0);
            }
        }
    }
    let mc = reduce_max_sum(local, lanes);
    let f = exp_scale(mc.y);
    var s = 0.0;
    for (var k = 0u; k < ITEMS; k++) {
        if ((valid & (1u << k)) != 0u) {
            s += exp_nonpos(f * (vals[k] - mc.x));
        }
    }
    let big_s = reduce_max_sum(vec2<f32>(0.0, s), lanes).y;
    for (var k = 0u; k < ITEMS; k++) {
        let j = lid + k * WG;
        if (j < p.n) {
            emit(base + j, vals[k], (valid & (1u << k)) != 0u, mc.x, big_s, mc.y, f);
        }
    }
}

// ---- tiny rows (n <= ITEMS): one invocation per row, no reductions ----
@compute @workgroup_size(WG)
fn softmax_thread_row(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = linear_workgroup(wid, nwg) * WG + lid;
    if (r >= p.rows) {
        return;
    }
    let base = r * p.n;
    var vals: array<f32, ITEMS>;
    var valid = 0u;
    var mc = vec2<f32>(SENTINEL, 0.0);
    for (var j = 0u; j < p.n; j++) {
        let v = signed(x[p.base + base + j]);
        vals[j] = v;
        if (is_valid(r, j)) {
            valid |= 1u << j;
            mc = vec2<f32>(max(mc.x, v), mc.y + 1.0);
        }
    }
    let f = exp_scale(mc.y);
    var big_s = 0.0;
    for (var j = 0u; j < p.n; j++) {
        if ((valid & (1u << j)) != 0u) {
            big_s += exp_nonpos(f * (vals[j] - mc.x));
        }
    }
    for (var j = 0u; j < p.n; j++) {
        emit(base + j, vals[j], (valid & (1u << j)) != 0u, mc.x, big_s, mc.y, f);
    }
}

// ---- long rows: (1) valid counts when softmax_plus meets a mask, (2) per-tile (m, s, c),
// (3) merge tiles per row, (4) normalise per tile. Loops stay short (tile_len / WG per
// invocation, tiles / WG per row): some drivers bound loop trip counts (llvmpipe at 65535). ----

// Valid entries per tile (into partials.z), then per row: every loop stays short, whatever n.
@compute @workgroup_size(WG)
fn tile_counts(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    lanes: Lanes,
) {
    let g = linear_workgroup(wid, nwg);
    if (g >= p.rows * p.tiles) {
        return;
    }
    let r = g / p.tiles;
    let j0 = (g % p.tiles) * p.tile_len;
    let j1 = min(j0 + p.tile_len, p.n);
    var c = 0.0;
    for (var j = j0 + lanes.lid; j < j1; j += WG) {
        if (is_valid(r, j)) {
            c += 1.0;
        }
    }
    let total = reduce_max_sum(vec2<f32>(0.0, c), lanes).y;
    if (lanes.lid == 0u) {
        partials[g] = vec4<f32>(0.0, 0.0, total, 0.0);
    }
}

@compute @workgroup_size(WG)
fn row_counts(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    lanes: Lanes,
) {
    let r = linear_workgroup(wid, nwg);
    if (r >= p.rows) {
        return;
    }
    var c = 0.0;
    for (var t = lanes.lid; t < p.tiles; t += WG) {
        c += partials[r * p.tiles + t].z;
    }
    let total = reduce_max_sum(vec2<f32>(0.0, c), lanes).y;
    if (lanes.lid == 0u) {
        counts[r] = total;
    }
}

fn row_exp_scale(r: u32) -> f32 {
    if (has(FLAG_PLUS) && has(FLAG_MASK)) {
        return exp_scale(counts[r]);
    }
    return exp_scale(band_count(r));
}

@compute @workgroup_size(WG)
fn tile_partials(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    lanes: Lanes,
) {
    let lid = lanes.lid;
    let g = linear_workgroup(wid, nwg);
    if (g >= p.rows * p.tiles) {
        return;
    }
    let r = g / p.tiles;
    let j0 = (g % p.tiles) * p.tile_len;
    let j1 = min(j0 + p.tile_len, p.n);
    let f = row_exp_scale(r);
    // Online (max, sum) per invocation.
    var m = SENTINEL;
    var s = 0.0;
    var c = 0.0;
    for (var j = j0 + lid; j < j1; j += WG) {
        if (is_valid(r, j)) {
            let v = signed(x[p.base + r * p.n + j]);
            if (c == 0.0) {
                m = v;
                s = 1.0;
            } else if (v > m) {
                s = s * exp_nonpos(f * (m - v)) + 1.0;
                m = v;
            } else {
                s += exp_nonpos(f * (v - m));
            }
            c += 1.0;
        }
    }
    let mc = reduce_max_sum(vec2<f32>(m, c), lanes);
    var scaled = 0.0;
    if (c > 0.0) {
        scaled = s * exp_nonpos(f * (m - mc.x));
    }
    let big_s = reduce_max_sum(vec2<f32>(0.0, scaled), lanes).y;
    if (lid == 0u) {
        partials[g] = vec4<f32>(mc.x, big_s, mc.y, 0.0);
    }
}

@compute @workgroup_size(WG)
fn row_merge(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    lanes: Lanes,
) {
    let lid = lanes.lid;
    let r = linear_workgroup(wid, nwg);
    if (r >= p.rows) {
        return;
    }
    let f = row_exp_scale(r);
    var local = vec2<f32>(SENTINEL, 0.0);
    for (var t = lid; t < p.tiles; t += WG) {
        let q = partials[r * p.tiles + t];
        if (q.z > 0.0) {
            local = vec2<f32>(max(local.x, q.x), local.y + q.z);
        }
    }
    let mc = reduce_max_sum(local, lanes);
    // (m_a, s_a) (+) (m_b, s_b) = (M, s_a e^(f(m_a - M)) + s_b e^(f(m_b - M)))
    var s = 0.0;
    for (var t = lid; t < p.tiles; t += WG) {
        let q = partials[r * p.tiles + t];
        if (q.z > 0.0) {
            s += q.y * exp_nonpos(f * (q.x - mc.x));
        }
    }
    let big_s = reduce_max_sum(vec2<f32>(0.0, s), lanes).y;
    if (lid == 0u) {
        stats[r] = vec4<f32>(mc.x, big_s, mc.y, f);
    }
}

@compute @workgroup_size(WG)
fn tile_normalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = linear_workgroup(wid, nwg);
    if (g >= p.rows * p.tiles) {
        return;
    }
    let r = g / p.tiles;
    let j0 = (g % p.tiles) * p.tile_len;
    let j1 = min(j0 + p.tile_len, p.n);
    let st = stats[r];
    for (var j = j0 + lid; j < j1; j += WG) {
        let e = r * p.n + j;
        let ok = is_valid(r, j);
        var v = 0.0;
        if (ok) {
            v = signed(x[p.base + e]);
        }
        emit(e, v, ok, st.x, st.y, st.z, st.w);
    }
}
