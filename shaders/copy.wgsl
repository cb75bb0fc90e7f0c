// vec4 copy: the bandwidth the adapter can actually reach, the denominator of every
// memory-bound figure. Prepended by the host: shaders/grid.wgsl.

override WG: u32 = 256u;
// vec4s per invocation, strided by WG so each step is one coalesced sweep.
override ITEMS: u32 = 4u;

struct Params {
    len: u32,   // vec4s in this binding chunk
}

@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn copy_vec4(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let base = linear_workgroup(wid, nwg) * WG * ITEMS + lid;
    for (var k = 0u; k < ITEMS; k++) {
        let i = base + k * WG;
        if (i < p.len) {
            dst[i] = src[i];
        }
    }
}
