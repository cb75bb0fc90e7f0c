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

// Both components summed; every invocation gets the result. Call in uniform control flow.
fn sum_tree(v: vec2<f32>, l: Lanes) -> vec2<f32> {
    red[l.lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (l.lid < stride) {
            red[l.lid] += red[l.lid + stride];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// Four sums, two at a time through the scratch. Call in uniform control flow.
fn reduce_sum4(v: vec4<f32>, l: Lanes) -> vec4<f32> {
    return vec4<f32>(sum_tree(v.xy, l), sum_tree(v.zw, l));
}
