// Workgroup reductions with subgroup operations. Interchangeable with reduce_shared.wgsl:
// both define `Lanes` (the entry point's invocation builtins), `reduce_max_sum` and
// `reduce_sum4`.
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

// Four sums; every invocation gets them. Call in uniform control flow. Each subgroup's total
// takes two scratch slots, which fit: subgroups have at least 4 invocations.
fn reduce_sum4(v: vec4<f32>, l: Lanes) -> vec4<f32> {
    let s = subgroupAdd(v);
    if (l.sg_lane == 0u) {
        red[2u * l.sg_id] = s.xy;
        red[2u * l.sg_id + 1u] = s.zw;
    }
    workgroupBarrier();
    var r = vec4<f32>(red[0], red[1]);
    for (var i = 1u; i < l.sg_count; i++) {
        r += vec4<f32>(red[2u * i], red[2u * i + 1u]);
    }
    workgroupBarrier();
    return r;
}
