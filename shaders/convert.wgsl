// f16 storage on adapters without SHADER_F16: f16 values stay packed two per u32 word and are
// widened to an f32 scratch before a kernel and narrowed after it. Each invocation owns one
// whole word, so no two invocations write the same word; the high half of an odd tensor's last
// word is not the tensor's (a wrapped buffer may hold more) and is kept. Prepended:
// shaders/grid.wgsl.

override WG: u32 = 256u;

struct Params {
    len: u32,   // f16 elements
}

@group(0) @binding(0) var<storage, read> packed_in: array<u32>;
@group(0) @binding(1) var<storage, read_write> wide_out: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read> wide_in: array<f32>;
@group(0) @binding(4) var<storage, read_write> packed_out: array<u32>;

@compute @workgroup_size(WG)
fn widen_f16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = linear_workgroup(wid, nwg) * WG + lid;
    let e = 2u * w;
    if (e >= p.len) {
        return;
    }
    let pair = unpack2x16float(packed_in[w]);
    wide_out[e] = pair.x;
    if (e + 1u < p.len) {
        wide_out[e + 1u] = pair.y;
    }
}

@compute @workgroup_size(WG)
fn narrow_f16(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = linear_workgroup(wid, nwg) * WG + lid;
    let e = 2u * w;
    if (e >= p.len) {
        return;
    }
    if (e + 1u < p.len) {
        packed_out[w] = pack2x16float(vec2<f32>(wide_in[e], wide_in[e + 1u]));
    } else {
        let lo = pack2x16float(vec2<f32>(wide_in[e], 0.0)) & 0xffffu;
        packed_out[w] = lo | (packed_out[w] & 0xffff0000u);
    }
}
