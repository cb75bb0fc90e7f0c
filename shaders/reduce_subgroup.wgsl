// Workgroup reductions with subgroup operations. Interchangeable with reduce_shared.wgsl:
// both define `Lanes` (the entry point's invocation builtins) and `reduce_max_sum`.
// The subgroup size is read from the builtins, never assumed. Needs `override WG`.

struct Lanes {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) sg_count: u32,
}

var<workgroup> red: array<vec2<f32>, WG>;

// .x reduced by max, .y by sum; every invocation gets the result. Call in uniform control flow.
fn reduce_max_sum(v: vec2<f32>, l: Lanes) -> vec2<f32> {
    let s = vec2<f32>(subgroupMax(v.x), subgroupAdd(v.y));
    if (l.sg_lane == 0u) {
        red[l.sg_id] = s;
    }
    workgroupBarrier();
    var r = red[0];
    for (var i = 1u; i < l.sg_count; i++) {
        let o = red[i];
        r = vec2<f32>(max(r.x, o.x), r.y + o.y);
    }
    // The scratch is reused by the next reduction.
    workgroupBarrier();
    return r;
}
