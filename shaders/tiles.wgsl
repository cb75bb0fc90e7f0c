// Tile engine: workgroup-memory tiles of row-major matrices and the small products on them,
// for exact attention's tile path (few query rows, key splits).
//
// The including shader provides, before or after this snippet:
//   const D: u32     depth of the A and B tiles (columns), padded
//   const DV: u32    columns of the V tile, padded
//   const T: u32     rows of every tile
//   const WG: u32    invocations per workgroup (a multiple of T)
//   fn tile_read(src: u32, i: u32) -> f32
//     flat element read of source matrix `src` (a number the includer assigns to each of its
//     bindings), converted to f32. Every loader takes the source it reads from, so one
//     shader can stage several matrices through the same tile.
// Loads are bounds-checked: rows past `rows` and columns past `cols` read as zero, so padded
// tiles contribute nothing to any product. Loads loop over the tile with stride WG (a few
// iterations per invocation, never a loop over a whole matrix).

const C: u32 = WG / T;       // invocations per tile row
const ACC: u32 = DV / C;     // accumulator columns per invocation (columns cg + k*C)

var<workgroup> tile_a: array<f32, T * D>;   // [T, D]  queries (staged by the includer)
var<workgroup> tile_b: array<f32, T * D>;   // [T, D]  keys
var<workgroup> tile_v: array<f32, T * DV>;  // [T, DV] values
var<workgroup> tile_p: array<f32, T * T>;   // [T, T]  probabilities

// Element e of a tile `width` wide: (row0 + e / width, e % width) of a matrix with `stride`
// elements per row starting at `base`, or zero outside `rows` x `cols`.
fn tile_elem(
    src: u32, base: u32, stride: u32, row0: u32, rows: u32, cols: u32, e: u32, width: u32,
) -> f32 {
    let r = e / width;
    let c = e % width;
    if (row0 + r < rows && c < cols) {
        return tile_read(src, base + (row0 + r) * stride + c);
    }
    return 0.0;
}

fn tile_load_b(src: u32, base: u32, stride: u32, row0: u32, rows: u32, cols: u32, lid: u32) {
    for (var e = lid; e < T * D; e += WG) {
        tile_b[e] = tile_elem(src, base, stride, row0, rows, cols, e, D);
    }
}

fn tile_load_v(src: u32, base: u32, stride: u32, row0: u32, rows: u32, cols: u32, lid: u32) {
    for (var e = lid; e < T * DV; e += WG) {
        tile_v[e] = tile_elem(src, base, stride, row0, rows, cols, e, DV);
    }
}

// (A B^T)[r, c] over the first `depth` (<= D) columns of the tiles.
fn tile_dot_ab(r: u32, c: u32, depth: u32) -> f32 {
    var s = 0.0;
    let a0 = r * D;
    let b0 = c * D;
    for (var k = 0u; k < min(depth, D); k++) {
        s = fma(tile_a[a0 + k], tile_b[b0 + k], s);
    }
    return s;
}

// (P V)[r, col]: row r of tile_p times column col of tile_v.
fn tile_pv(r: u32, col: u32) -> f32 {
    var s = 0.0;
    for (var j = 0u; j < T; j++) {
        s = fma(tile_p[r * T + j], tile_v[j * DV + col], s);
    }
    return s;
}
