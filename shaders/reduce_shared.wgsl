// Workgroup reductions in shared memory, for adapters without subgroups. Interchangeable with
// reduce_subgroup.wgsl. Needs `override WG` (a power of two).

struct Lanes {
    @builtin(local_invocation_index) lid: u32,
}

var<workgroup> red: array<vec2<f32>, WG>;

// .x reduced by max, .y by sum; every invocation gets the result. Call in uniform control flow.
fn reduce_max_sum(v: vec2<f32>, l: Lanes) -> vec2<f32> {
    red[l.lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (l.lid < stride) {
            let o = red[l.lid + stride];
            red[l.lid] = vec2<f32>(max(red[l.lid].x, o.x), red[l.lid].y + o.y);
        }
        workgroupBarrier();
    }
    let r = red[0];
    // The scratch is reused by the next reduction.
    workgroupBarrier();
    return r;
}
