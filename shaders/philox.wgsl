// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"), counter-based:
// every draw is a pure function of (counter, key). WGSL has no 64-bit integers, so the high
// word of the 32x32 products is built from 16-bit limbs. Shared by every kernel that draws.
//
// Gibbs counter layout: (v / 4, site, chain, sweep), key = (seed low, seed high); the four
// outputs serve v = 4 (v / 4) + 0..3.

const PHILOX_M0: u32 = 0xD2511F53u;
const PHILOX_M1: u32 = 0xCD9E8D57u;
const PHILOX_W0: u32 = 0x9E3779B9u;
const PHILOX_W1: u32 = 0xBB67AE85u;

// (high, low) words of the 64-bit product a * b.
fn philox_mulhilo(a: u32, b: u32) -> vec2<u32> {
    let al = a & 0xffffu;
    let ah = a >> 16u;
    let bl = b & 0xffffu;
    let bh = b >> 16u;
    let ll = al * bl;
    let lh = al * bh;
    let hl = ah * bl;
    let hh = ah * bh;
    // Carries out of the low 32 bits: each term is below 2^17, so the sum cannot overflow.
    let mid = (ll >> 16u) + (lh & 0xffffu) + (hl & 0xffffu);
    let hi = hh + (lh >> 16u) + (hl >> 16u) + (mid >> 16u);
    return vec2<u32>(hi, a * b);
}

fn philox4x32_10(ctr: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    var c = ctr;
    var k = key;
    for (var round = 0u; round < 10u; round++) {
        let p0 = philox_mulhilo(PHILOX_M0, c.x);
        let p1 = philox_mulhilo(PHILOX_M1, c.z);
        c = vec4<u32>(p1.x ^ c.y ^ k.x, p1.y, p0.x ^ c.w ^ k.y, p0.y);
        k += vec2<u32>(PHILOX_W0, PHILOX_W1);
    }
    return c;
}

// -log(U) for U = ((r >> 8) + 0.5) * 2^-24, without ever producing 0 or an infinity.
// Below U = 1/2 the f32 value of U is exact; above, 1 - U is exact and -log(1 - d) is taken
// from its series where log(1 - d) would lose digits.
fn neg_log_uniform(r: u32) -> f32 {
    let m = r >> 8u;
    if (m < 0x800000u) {
        return -log((f32(m) + 0.5) * 5.9604644775390625e-8);
    }
    let d = (f32(0x1000000u - m) - 0.5) * 5.9604644775390625e-8;
    if (d > 0.0625) {
        return -log(1.0 - d);
    }
    return d * (1.0 + d * (0.5 + d * (0.33333334 + d * (0.25 + d * (0.2 + d * (0.16666667
        + d * 0.14285715))))));
}

// Standard Gumbel draw g = -log(-log U) from one 32-bit word; finite, in [-2.9, 17.4].
fn gumbel(r: u32) -> f32 {
    return -log(neg_log_uniform(r));
}
