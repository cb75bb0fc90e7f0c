// Grids larger than 65535 workgroups are folded into y and z by the host (src/dispatch.rs);
// this recovers the linear workgroup index. Uniform across the workgroup.
fn linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + nwg.x * (wid.y + nwg.y * wid.z);
}
