// Gibbs family: chromatic (red-black) Gibbs sweeps over a chain model, best-state tracking,
// sampling from given logits with temperature / top-k / top-p, a Metropolis-Hastings accept
// step, and a Philox test entry point.
//
// Chain model: p(x) ∝ exp((sum_i u[i, x_i] + sum_{i>=1} W[x_{i-1}, x_i]) / T). W is dense
// [V, V] (rank = 0) or factorised W = A B^T with A, B [V, rank].
// A draw is argmax_v (e_v + T g_v) with e_v the site's energy and g_v Gumbel noise, which is
// argmax_v (e_v / T + g_v) for T > 0 and the plain argmax (ICM) at T = 0. Ties go to the
// lowest v.
//
// Prepended by the host: shaders/grid.wgsl, shaders/philox.wgsl and one of
// shaders/reduce_subgroup.wgsl or shaders/reduce_shared.wgsl (`Lanes`, `reduce_max_sum`,
// `reduce_sum4`).
// No infinities: maxima start at a finite sentinel with "no index yet" = NONE.

override WG: u32 = 64u;

struct Params {
    chains: u32,        // chains (or logits rows) in this binding chunk
    len: u32,           // L
    vocab: u32,         // V
    rank: u32,          // 0: dense W; else the rank of A B^T
    parity: u32,        // colour of this half-sweep: sites i with i % 2 == parity
    sites: u32,         // sites of that colour: (L - parity + 1) / 2
    sweep: u32,         // Philox counter word 3 (sweep index, or sampling / MH step)
    chain_offset: u32,  // global index of this chunk's first chain
    seed_lo: u32,
    seed_hi: u32,
    temperature: f32,
    flags: u32,         // FLAG_*
    top_k: u32,         // sampling: 0 = off
    top_p: f32,         // sampling: share of the mass top-p keeps (SampleOptions::top_p_goal); 1 = off
    logits_base: u32,   // sampling: element of the binding where this chunk's first row starts
    _pad1: u32,
}

const FLAG_UNARY_PER_CHAIN: u32 = 1u;
const FLAG_CLAMP: u32 = 2u;
const FLAG_CLAMP_PER_CHAIN: u32 = 4u;
const FLAG_BEST_INIT: u32 = 8u;
// The lowest finite f32, not -3.0e38: finite logits below -3.0e38 (f32::MIN as a mask value)
// must still compare above it, or the argmax and the sampler's row maximum lose them.
const SENTINEL: f32 = -0x1.fffffep+127f;
const NONE: u32 = 0xffffffffu;
// Candidate index of a lane without the maximum, for the min-index reduction (as -index).
const NO_CANDIDATE: f32 = -16777216.0;

@group(0) @binding(0) var<storage, read> unary: array<f32>;        // [L, V] or [b, L, V]; logits [b, V]
@group(0) @binding(1) var<storage, read> pair_a: array<f32>;       // W [V, V] or A [V, r]
@group(0) @binding(2) var<storage, read> pair_b: array<f32>;       // B [V, r] (dense: unused)
@group(0) @binding(3) var<storage, read_write> tokens: array<u32>; // [b, L]; samples [b] (all rows)
@group(0) @binding(4) var<storage, read> clamp_mask: array<u32>;   // [L] or [b, L] bytes, 4 per word
@group(0) @binding(5) var<uniform> p: Params;
@group(0) @binding(6) var<storage, read_write> best_tokens: array<u32>; // [b, L]
@group(0) @binding(7) var<storage, read_write> best_score: array<f32>;  // [b] (all chains)
@group(0) @binding(8) var<storage, read> proposal: array<u32>;          // MH: y [b, L]
@group(0) @binding(9) var<storage, read_write> score_x: array<f32>;     // MH: score(x) [b]
@group(0) @binding(10) var<storage, read> score_y: array<f32>;          // MH: score(y) [b]
@group(0) @binding(11) var<storage, read> log_q_fwd: array<f32>;        // MH: log q(y <- x) [b]
@group(0) @binding(12) var<storage, read> log_q_back: array<f32>;       // MH: log q(x <- y) [b]
@group(0) @binding(13) var<storage, read_write> accepted: array<u32>;   // MH: 1 = accepted [b]

fn has(flag: u32) -> bool {
    return (p.flags & flag) != 0u;
}

// W[a, v].
fn pair(a: u32, v: u32) -> f32 {
    if (p.rank == 0u) {
        return pair_a[a * p.vocab + v];
    }
    var s = 0.0;
    for (var k = 0u; k < p.rank; k++) {
        s += pair_a[a * p.rank + k] * pair_b[v * p.rank + k];
    }
    return s;
}

fn unary_base(c: u32, i: u32) -> u32 {
    if (has(FLAG_UNARY_PER_CHAIN)) {
        return (c * p.len + i) * p.vocab;
    }
    return i * p.vocab;
}

fn is_clamped(c: u32, i: u32) -> bool {
    if (!has(FLAG_CLAMP)) {
        return false;
    }
    var e = i;
    if (has(FLAG_CLAMP_PER_CHAIN)) {
        e = c * p.len + i;
    }
    return ((clamp_mask[e >> 2u] >> ((e & 3u) * 8u)) & 0xffu) != 0u;
}

// A neighbour's token, kept inside the vocabulary so a bad token can never read out of bounds
// (the host rejects such tokens before a run).
fn token_at(e: u32) -> u32 {
    return min(tokens[e], p.vocab - 1u);
}

// Energy of token v at site i of chain c given its neighbours.
fn site_energy(ub: u32, i: u32, v: u32, left: u32, right: u32) -> f32 {
    var e = unary[ub + v];
    if (i > 0u) {
        e += pair(left, v);
    }
    if (i + 1u < p.len) {
        e += pair(v, right);
    }
    return e;
}

struct Site {
    chain: u32,  // local chain index
    i: u32,      // site
    ub: u32,     // unary row base
    left: u32,   // token at i - 1 (or 0)
    right: u32,  // token at i + 1 (or 0)
}

fn site_of(unit: u32) -> Site {
    let c = unit / p.sites;
    let i = 2u * (unit % p.sites) + p.parity;
    let row = c * p.len;
    var left = 0u;
    var right = 0u;
    if (i > 0u) {
        left = token_at(row + i - 1u);
    }
    if (i + 1u < p.len) {
        right = token_at(row + i + 1u);
    }
    return Site(c, i, unary_base(c, i), left, right);
}

fn key() -> vec2<u32> {
    return vec2<u32>(p.seed_lo, p.seed_hi);
}

// Running argmax of z + n over tokens v: z an energy or logit, n its Gumbel noise times T.
struct Best {
    z: f32,
    n: f32,
    v: u32,
}

// 1, 0 or -1 as z + n is above, equal to or below b.z + b.n. Compared as z - b.z against
// b.n - n, halved (so neither overflows): adding the noise to a large z first would round
// it away, and a logit of 1e7 at T = 1 would draw as if T were smaller.
fn versus(z: f32, n: f32, b: Best) -> i32 {
    var lhs = z;
    var rhs = b.z;
    if (n != b.n) {
        lhs = 0.5 * z - 0.5 * b.z;
        rhs = 0.5 * b.n - 0.5 * n;
    }
    return select(select(0i, -1i, lhs < rhs), 1i, lhs > rhs);
}

// v visited in increasing order per lane: strictly above keeps the lowest v.
fn offer(b: Best, z: f32, n: f32, v: u32) -> Best {
    if (b.v == NONE || versus(z, n, b) > 0i) {
        return Best(z, n, v);
    }
    return b;
}

// v visited in any order: ties to the lowest v.
fn offer_lowest(b: Best, z: f32, n: f32, v: u32) -> Best {
    let c = versus(z, n, b);
    if (b.v == NONE || c > 0i || (c == 0i && v < b.v)) {
        return Best(z, n, v);
    }
    return b;
}

// Scores the four tokens 4q .. 4q + 3 of a site (those below V) into the running argmax.
fn offer_block(b0: Best, s: Site, q: u32) -> Best {
    var b = b0;
    var r = vec4<u32>(0u);
    if (p.temperature > 0.0) {
        r = philox4x32_10(vec4<u32>(q, s.i, p.chain_offset + s.chain, p.sweep), key());
    }
    for (var j = 0u; j < 4u; j++) {
        let v = 4u * q + j;
        if (v < p.vocab) {
            var n = 0.0;
            if (p.temperature > 0.0) {
                n = p.temperature * gumbel(r[j]);
            }
            b = offer(b, site_energy(s.ub, s.i, v, s.left, s.right), n, v);
        }
    }
    return b;
}

// ---- small V: one invocation per site of the current colour ----
@compute @workgroup_size(WG)
fn sweep_thread(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let unit = linear_workgroup(wid, nwg) * WG + lid;
    if (unit >= p.chains * p.sites) {
        return;
    }
    let s = site_of(unit);
    if (is_clamped(s.chain, s.i)) {
        return;
    }
    var b = Best(SENTINEL, 0.0, NONE);
    for (var q = 0u; 4u * q < p.vocab; q++) {
        b = offer_block(b, s, q);
    }
    tokens[s.chain * p.len + s.i] = b.v;
}

// Workgroup argmax of z + n with ties to the lowest v: the maximum, then the lowest index
// among the lanes holding it. Call in uniform control flow, `noisy` uniform. With noise,
// each lane's z + n is taken relative to the largest z held (halved, as in `versus`), which
// keeps the noise of the contenders; without, z is compared as it is (halving would merge
// neighbours near the smallest normal). Lanes without a candidate hold SENTINEL, at or below
// every finite value, so some candidate holds the maximum; only non-finite z (outside
// WGSL's finite math) can leave none, and then the result is token 0, the lowest of a row
// that ties throughout, never an index outside the vocabulary.
fn workgroup_argmax(b: Best, noisy: bool, lanes: Lanes) -> u32 {
    var y = b.z;
    if (noisy) {
        let top = reduce_max_sum(vec2<f32>(b.z, 0.0), lanes).x;
        if (b.v != NONE) {
            y = max((0.5 * b.z - 0.5 * top) + 0.5 * b.n, SENTINEL);
        }
    }
    let m = reduce_max_sum(vec2<f32>(y, 0.0), lanes).x;
    var cand = NO_CANDIDATE;
    if (b.v != NONE && y == m) {
        cand = -f32(b.v);
    }
    let v = u32(-reduce_max_sum(vec2<f32>(cand, 0.0), lanes).x);
    return select(0u, v, v < p.vocab);
}

// ---- large V: one workgroup per site, tokens in blocks of 4 (one Philox call) per lane ----
@compute @workgroup_size(WG)
fn sweep_group(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    lanes: Lanes,
) {
    let unit = linear_workgroup(wid, nwg);
    if (unit >= p.chains * p.sites) {
        return;
    }
    let s = site_of(unit);
    var b = Best(SENTINEL, 0.0, NONE);
    for (var q = lanes.lid; 4u * q < p.vocab; q += WG) {
        b = offer_block(b, s, q);
    }
    let v = workgroup_argmax(b, p.temperature > 0.0, lanes);
    // Clamped sites are still reduced (uniform control flow), just not written.
    if (lanes.lid == 0u && !is_clamped(s.chain, s.i)) {
        tokens[s.chain * p.len + s.i] = v;
    }
}

// ---- score of each chain's state; keeps the best state seen (FLAG_BEST_INIT: take it) ----
@compute @workgroup_size(WG)
fn chain_score(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = linear_workgroup(wid, nwg) * WG + lid;
    if (c >= p.chains) {
        return;
    }
    let row = c * p.len;
    var s = 0.0;
    var prev = 0u;
    for (var i = 0u; i < p.len; i++) {
        let x = token_at(row + i);
        s += unary[unary_base(c, i) + x];
        if (i > 0u) {
            s += pair(prev, x);
        }
        prev = x;
    }
    // Scores and samples, 4 bytes a row, are bound whole and indexed by the global row, so
    // chunk starts need not make their offsets aligned.
    let g = p.chain_offset + c;
    if (has(FLAG_BEST_INIT) || s > best_score[g]) {
        best_score[g] = s;
        for (var i = 0u; i < p.len; i++) {
            best_tokens[row + i] = tokens[row + i];
        }
    }
}

// ---- sampling from given logits [b, V]: temperature, then top-k, then top-p ----

// Top-k kept sets of up to this many tokens are gathered into workgroup memory, so that
// top-p and the draw visit only them.
const CANDIDATES: u32 = 1024u;

var<workgroup> digit_count: array<atomic<u32>, 256>;
var<workgroup> radix_pick: vec2<u32>;   // (digit, rank left within it), read uniformly
var<workgroup> lane_first: array<u32, WG>;   // each lane's first candidate slot
var<workgroup> cand_total: u32;              // candidates in all, read uniformly
var<workgroup> cand_z: array<f32, CANDIDATES>;
var<workgroup> cand_v: array<u32, CANDIDATES>;
var<workgroup> tie_split: u32;          // whether top-p splits its threshold's ties, read uniformly

// Order-preserving map of a finite f32 to u32; -0.0 takes +0.0's key, as the two compare
// equal (a tie at the top-k / top-p threshold).
fn order_key(x: f32) -> u32 {
    var u = bitcast<u32>(x);
    if (u == 0x80000000u) {
        u = 0u;
    }
    if ((u & 0x80000000u) != 0u) {
        return ~u;
    }
    return u | 0x80000000u;
}

// The order key of the k-th largest logit of the row at `base` (1 <= k <= V): a radix
// select, 8 bits a pass from the top, each pass counting the keys under the prefix found so
// far by their next digit. Call in uniform control flow.
fn kth_largest_key(base: u32, k: u32, lid: u32) -> u32 {
    var prefix = 0u;
    var rank = k;
    for (var level = 0u; level < 4u; level++) {
        let shift = 24u - 8u * level;
        let above = ~(0xffffffffu >> (8u * level));   // the digits already chosen
        for (var i = lid; i < 256u; i += WG) {
            atomicStore(&digit_count[i], 0u);
        }
        workgroupBarrier();
        for (var v = lid; v < p.vocab; v += WG) {
            let key = order_key(unary[base + v]);
            if ((key & above) == prefix) {
                atomicAdd(&digit_count[(key >> shift) & 255u], 1u);
            }
        }
        workgroupBarrier();
        if (lid == 0u) {
            // The digit holding the rank-th largest key under the prefix, from the top.
            var left = rank;
            var pick = 0u;
            for (var d = 255i; d >= 0i; d--) {
                let c = atomicLoad(&digit_count[u32(d)]);
                if (c >= left) {
                    pick = u32(d);
                    break;
                }
                left -= c;
            }
            radix_pick = vec2<u32>(pick, left);
        }
        let pick = workgroupUniformLoad(&radix_pick);
        prefix |= pick.x << shift;
        rank = pick.y;
    }
    return prefix;
}

struct Logit {
    z: f32,
    v: u32,
}

// Element i of what the sampler visits: the gathered candidates, or the whole row.
fn element(base: u32, i: u32, gathered: bool) -> Logit {
    if (gathered) {
        return Logit(cand_z[i], cand_v[i]);
    }
    return Logit(unary[base + i], i);
}

// The logit whose order key is k (+0.0 for the zeros' shared key).
fn key_value(k: u32) -> f32 {
    if ((k & 0x80000000u) != 0u) {
        return bitcast<f32>(k & 0x7fffffffu);
    }
    return bitcast<f32>(~k);
}

// The searches below fix 2 bits a pass: `x` with its next digit (at `shift`) set to 0..3, and
// the largest digit whose test holds (the tests hold for a prefix of the digits; 0 if none).
fn next_digits(x: u32, shift: u32) -> vec4<u32> {
    return vec4<u32>(x) | (vec4<u32>(0u, 1u, 2u, 3u) << vec4<u32>(shift));
}

fn last_digit(holds: vec4<bool>) -> u32 {
    let d = select(vec4<u32>(0u), vec4<u32>(0u, 1u, 2u, 3u), holds);
    return max(max(d.x, d.y), max(d.z, d.w));
}

// This lane's share of the weight exp((z - zmax) / t) of the visited tokens whose key is at
// least each of the 4 thresholds max(k | (d << shift), kmin), d = 0..3.
fn lane_mass(
    base: u32,
    count: u32,
    gathered: bool,
    k: u32,
    shift: u32,
    kmin: u32,
    zmax: f32,
    t: f32,
    lid: u32,
) -> vec4<f32> {
    let lo = max(next_digits(k, shift), vec4<u32>(kmin));
    var mass = vec4<f32>(0.0);
    for (var i = lid; i < count; i += WG) {
        let e = element(base, i, gathered);
        let key = vec4<u32>(order_key(e.z));
        if (key.x >= lo.x) {
            mass += select(vec4<f32>(0.0), vec4<f32>(exp((e.z - zmax) / t)), key >= lo);
        }
    }
    return mass;
}

// This lane's count of the visited tokens whose key is k and index below each of the 4
// bounds j | (d << shift), d = 0..3.
fn lane_count(
    base: u32,
    count: u32,
    gathered: bool,
    k: u32,
    j: u32,
    shift: u32,
    lid: u32,
) -> vec4<f32> {
    let below = next_digits(j, shift);
    var n = vec4<f32>(0.0);
    for (var i = lid; i < count; i += WG) {
        let e = element(base, i, gathered);
        if (order_key(e.z) == k) {
            n += select(vec4<f32>(0.0), vec4<f32>(1.0), vec4<u32>(e.v) < below);
        }
    }
    return n;
}

@compute @workgroup_size(WG)
fn sample_logits(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    lanes: Lanes,
) {
    let lid = lanes.lid;
    let row = linear_workgroup(wid, nwg);
    if (row >= p.chains) {
        return;
    }
    let base = p.logits_base + row * p.vocab;
    let t = p.temperature;
    var zmax = SENTINEL;
    for (var v = lid; v < p.vocab; v += WG) {
        zmax = max(zmax, unary[base + v]);
    }
    zmax = reduce_max_sum(vec2<f32>(zmax, 0.0), lanes).x;
    // Smallest order key kept: top-k keeps every tie of its k-th logit.
    var kmin = 0u;
    var gathered = false;
    var count = p.vocab;
    if (t > 0.0 && p.top_k > 0u && p.top_k < p.vocab) {
        kmin = kth_largest_key(base, p.top_k, lid);
        // Gathered in a fixed order (lane by lane, each lane's in increasing v), so that the
        // f32 sums over them, and so the kept set, do not depend on scheduling.
        var mine = 0u;
        for (var v = lid; v < p.vocab; v += WG) {
            if (order_key(unary[base + v]) >= kmin) {
                mine += 1u;
            }
        }
        lane_first[lid] = mine;
        workgroupBarrier();
        if (lid == 0u) {
            var run = 0u;
            for (var i = 0u; i < WG; i++) {
                let c = lane_first[i];
                lane_first[i] = run;
                run += c;
            }
            cand_total = run;
        }
        let n = workgroupUniformLoad(&cand_total);
        // More ties of the k-th logit than fit: visit the whole row.
        gathered = n <= CANDIDATES;
        if (gathered) {
            var slot = lane_first[lid];
            for (var v = lid; v < p.vocab; v += WG) {
                let z = unary[base + v];
                if (order_key(z) >= kmin) {
                    cand_z[slot] = z;
                    cand_v[slot] = v;
                    slot += 1u;
                }
            }
        }
        workgroupBarrier();
        count = select(p.vocab, n, gathered);
    }
    // Top-p keeps every token above its threshold key and, of those at it, the fewest that
    // reach the goal, lowest indices first (the smallest set): up to index `last_tied`.
    var last_tied = 0xffffffffu;
    if (t > 0.0 && p.top_p < 1.0) {
        let kept = lane_mass(base, count, gathered, kmin, 0u, kmin, zmax, t, lid);
        let total = reduce_sum4(kept, lanes).x;
        let goal = p.top_p * total;
        // The largest key whose kept set still reaches the goal, 2 bits a pass from the top
        // (a row pass and a reduction for each 2 bits, not for each bit). The mass falls as
        // the threshold rises, so the digit is the largest whose mass reaches the goal.
        var k = 0u;
        for (var shift = 30i; shift >= 0i; shift -= 2i) {
            let lane = lane_mass(base, count, gathered, k, u32(shift), kmin, zmax, t, lid);
            let reached = reduce_sum4(lane, lanes) >= vec4<f32>(goal);
            k |= last_digit(reached) << u32(shift);
        }
        // k >= kmin: every threshold up to kmin keeps the whole top-k set, whose mass is total.
        // k is a token's key, below 0xffffffff for finite logits, so k + 1 does not wrap.
        kmin = k;
        let higher = lane_mass(base, count, gathered, k + 1u, 0u, kmin, zmax, t, lid);
        let above = reduce_sum4(higher, lanes).x;
        let tied = reduce_sum4(lane_count(base, count, gathered, k, NONE, 0u, lid), lanes).x;
        // The tokens at k weigh the same; an underflowed weight keeps them all rather than
        // divide by 0.
        let w = exp((key_value(k) - zmax) / t);
        let need = select(tied, max(ceil((goal - above) / w), 1.0), w > 0.0);
        if (lid == 0u) {
            tie_split = select(0u, 1u, need < tied);
        }
        if (workgroupUniformLoad(&tie_split) == 1u) {
            // The largest j with fewer than `need` tokens at k below it: the need-th is j.
            // 2 bits a pass, as the threshold search; the count rises with the bound.
            var j = 0u;
            for (var shift = i32(firstLeadingBit(p.vocab) & ~1u); shift >= 0i; shift -= 2i) {
                let lane = lane_count(base, count, gathered, k, j, u32(shift), lid);
                let fewer = reduce_sum4(lane, lanes) < vec4<f32>(need);
                j |= last_digit(fewer) << u32(shift);
            }
            last_tied = j;
        }
    }
    var b = Best(SENTINEL, 0.0, NONE);
    if (gathered) {
        // One Philox call per candidate, the word its token takes in the row's stream.
        for (var i = lid; i < count; i += WG) {
            let e = element(base, i, true);
            let kz = order_key(e.z);
            if (kz > kmin || (kz == kmin && e.v <= last_tied)) {
                let r = philox4x32_10(vec4<u32>(e.v / 4u, 0u, p.chain_offset + row, p.sweep), key());
                b = offer_lowest(b, e.z, t * gumbel(r[e.v % 4u]), e.v);
            }
        }
    } else {
        for (var q = lid; 4u * q < p.vocab; q += WG) {
            var r = vec4<u32>(0u);
            if (t > 0.0) {
                r = philox4x32_10(vec4<u32>(q, 0u, p.chain_offset + row, p.sweep), key());
            }
            for (var j = 0u; j < 4u; j++) {
                let v = 4u * q + j;
                if (v < p.vocab) {
                    let z = unary[base + v];
                    let kz = order_key(z);
                    if (kz > kmin || (kz == kmin && v <= last_tied)) {
                        var n = 0.0;
                        if (t > 0.0) {
                            n = t * gumbel(r[j]);
                        }
                        b = offer(b, z, n, v);
                    }
                }
            }
        }
    }
    let v = workgroup_argmax(b, t > 0.0, lanes);
    if (lid == 0u) {
        tokens[p.chain_offset + row] = v;
    }
}

// ---- Metropolis-Hastings accept step, one invocation per chain ----
// Accept y over x with probability min(1, exp((score(y) - score(x)) / T + log q(x <- y)
// - log q(y <- x))); T = 0 accepts iff score(y) >= score(x). U from Philox counter
// (0, 0xffffffff, chain, step), word 0.
@compute @workgroup_size(WG)
fn mh_accept(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = linear_workgroup(wid, nwg) * WG + lid;
    if (c >= p.chains) {
        return;
    }
    let sx = score_x[c];
    let sy = score_y[c];
    var ok = sy >= sx;
    if (p.temperature > 0.0) {
        let delta = (sy - sx) / p.temperature + log_q_back[c] - log_q_fwd[c];
        let r = philox4x32_10(vec4<u32>(0u, 0xffffffffu, p.chain_offset + c, p.sweep), key());
        // log U < delta, with -log U > 0 always finite.
        ok = delta >= 0.0 || -neg_log_uniform(r.x) < delta;
    }
    if (ok) {
        score_x[c] = sy;
        let row = c * p.len;
        for (var i = 0u; i < p.len; i++) {
            tokens[row + i] = proposal[row + i];
        }
    }
    accepted[c] = select(0u, 1u, ok);
}

// ---- known-answer test of the WGSL Philox: tokens holds (ctr, key) as 6 words per case ----
@compute @workgroup_size(WG)
fn philox_test(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let n = linear_workgroup(wid, nwg) * WG + lid;
    if (n >= p.chains) {
        return;
    }
    let a = 6u * n;
    let out = philox4x32_10(
        vec4<u32>(tokens[a], tokens[a + 1u], tokens[a + 2u], tokens[a + 3u]),
        vec2<u32>(tokens[a + 4u], tokens[a + 5u]),
    );
    for (var j = 0u; j < 4u; j++) {
        best_tokens[4u * n + j] = out[j];
    }
}
