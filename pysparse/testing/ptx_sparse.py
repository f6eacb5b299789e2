"""A Python model of one warp's sparse ``mma.sp`` A operand, written from the PTX ISA text.

It answers: given what each of the 32 threads holds in its A registers (the compressed, non-zero
values) and in its metadata register, which dense 16 x K tile of A does the instruction multiply?
The tests feed it the kernels' fragments (built from ``formats.sparse24`` re-packed buffers) and
compare with ``decompress``, so the host-side packing is checked without a GPU.

Sources (PTX ISA, "Matrix multiply-accumulate operation using mma.sp instruction with sparse
matrix A"):

* "Sparse matrix storage": at 2:4 granularity every 4-wide chunk of a row keeps two elements;
  the metadata holds a 2-bit index per kept element, the first kept element's index in the lower
  bits of the chunk's 4-bit field. With ``::ordered_metadata`` the two indices ascend. In each
  group of four consecutive threads the sparsity selector names the thread(s) holding metadata.
* Fragments for sparse m16n8k32 .f16/.bf16: four .b32 registers a0..a7 (two values each);
  ``groupID = laneid >> 2``, ``threadID_in_group = laneid % 4``; row = groupID for a0, a1, a4,
  a5 and groupID + 8 otherwise; compressed column = threadID_in_group * 2 + (i & 1), plus 8 for
  i >= 4 (the dense m16n8k16 A layout on the compressed 16 x 16 tile). Metadata: with selector
  s, threads 4g + 2s and 4g + 2s + 1 hold it; thread 4g + 2s + j covers chunks 4j..4j+3 (dense
  columns 16j..16j+15), bits [15:0] for row g and bits [31:16] for row g + 8, chunk c of the
  four at bits 4c..4c+3.
* Fragments for sparse m16n8k64 .s8: four .b32 registers a0..a15 (four values each); row =
  groupID for a0..a3 and a8..a11, groupID + 8 otherwise; dense columns threadID_in_group * 8
  (+ 32 for i >= 8) .. + 7, i.e. compressed column threadID_in_group * 4 + (i % 4), plus 16
  for i >= 8. Metadata (selector 0 only): all four threads of a group hold it (figures for
  columns 0-31 and 32-63); thread 4g + j holds one row's eight chunks: row g + 8 (j % 2),
  chunks 8 (j // 2)..8 (j // 2) + 7, chunk c of the eight at bits 4c..4c+3. (The figures are
  images; the f16 reading is confirmed by LLVM's executed sparse-mma-2-4-f16.mlir test, the s8
  one follows CUTLASS's per-row 32-bit int8 metadata element; see formats/sparse24.py.)
"""
import torch

# kind -> (dense K of one instruction, A values per thread, threads per group holding metadata)
SHAPES = {"f16": (32, 8, 2), "int8": (64, 16, 4)}


def _kind(kind):
    if kind not in SHAPES:
        raise ValueError(f"ptx_sparse: kind must be one of {sorted(SHAPES)}, got {kind!r}")
    return SHAPES[kind]


def a_element_position(kind: str, lane: int, i: int):
    """(row, compressed column) of A element a_i held by ``lane`` (PTX fragment formulas)."""
    _kind(kind)
    g, t = lane >> 2, lane % 4
    if kind == "f16":
        row = g if i in (0, 1, 4, 5) else g + 8
        col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    else:
        row = g if (i < 4 or 8 <= i < 12) else g + 8
        col = t * 4 + (i % 4) + (16 if i >= 8 else 0)
    return row, col


def metadata_owner(kind: str, row: int, chunk: int, selector: int = 0):
    """(lane, lowest bit) of the 4-bit metadata field of ``chunk`` (4 dense columns) of ``row``."""
    _kind(kind)
    max_sel = {"f16": 1, "int8": 0}[kind]
    if not 0 <= selector <= max_sel:
        raise ValueError(f"ptx_sparse: sparsity selector {selector} out of range for {kind}")
    if kind == "f16":
        return 4 * (row % 8) + 2 * selector + chunk // 4, 16 * (row // 8) + 4 * (chunk % 4)
    return 4 * (row % 8) + 2 * (chunk // 8) + row // 8, 4 * (chunk % 8)


def a_fragments(compressed_tile: torch.Tensor, kind: str) -> torch.Tensor:
    """What the A registers of each lane hold for a compressed 16 x K/2 tile: [32, values]."""
    k, nvals, _ = _kind(kind)
    if tuple(compressed_tile.shape) != (16, k // 2):
        raise ValueError(f"ptx_sparse: expected a compressed tile [16, {k // 2}], got "
                         f"{tuple(compressed_tile.shape)}")
    out = compressed_tile.new_zeros(32, nvals)
    for lane in range(32):
        for i in range(nvals):
            r, c = a_element_position(kind, lane, i)
            out[lane, i] = compressed_tile[r, c]
    return out


def dense_a_tile(a_regs: torch.Tensor, meta_regs, kind: str, selector: int = 0) -> torch.Tensor:
    """The dense 16 x K tile of A one mma.sp multiplies.

    a_regs [32, values]: each lane's A values in register order (a0, a1, ...); meta_regs: 32
    integers (the lanes' 32-bit metadata registers; only the lanes the selector names are read).
    Raises ValueError on a metadata field the PTX ISA calls invalid (equal indices) or, for
    ``::ordered_metadata``, not ascending.
    """
    k, nvals, _ = _kind(kind)
    if tuple(a_regs.shape) != (32, nvals):
        raise ValueError(f"ptx_sparse: a_regs must be [32, {nvals}], got {tuple(a_regs.shape)}")
    compressed = a_regs.new_zeros(16, k // 2)
    for lane in range(32):
        for i in range(nvals):
            r, c = a_element_position(kind, lane, i)
            compressed[r, c] = a_regs[lane, i]
    dense = a_regs.new_zeros(16, k)
    for row in range(16):
        for chunk in range(k // 4):
            lane, bit = metadata_owner(kind, row, chunk, selector)
            field = (int(meta_regs[lane]) & 0xFFFFFFFF) >> bit & 0xF
            i0, i1 = field & 3, field >> 2
            if i0 >= i1:
                raise ValueError(f"ptx_sparse: metadata field {field:#06b} of row {row}, chunk "
                                 f"{chunk} is invalid or not ordered")
            dense[row, 4 * chunk + i0] = compressed[row, 2 * chunk]
            dense[row, 4 * chunk + i1] = compressed[row, 2 * chunk + 1]
    return dense


def b_element_position(kind: str, lane: int, i: int):
    """(k row, n column) of B element b_i held by ``lane``: four .b32 registers for both kinds;
    f16 (two values per register): row = threadID_in_group * 2 + (i & 1) + 8 * (i >> 1);
    s8 (four per register): row = threadID_in_group * 4 + (i % 4) + 16 * (i // 4); column =
    groupID (PTX fragments of B for sparse m16n8k32 .f16 and m16n8k64 .s8)."""
    _kind(kind)
    g, t = lane >> 2, lane % 4
    if kind == "f16":
        return t * 2 + (i & 1) + 8 * (i >> 1), g
    return t * 4 + (i % 4) + 16 * (i // 4), g


def ldmatrix_x4(smem: torch.Tensor, row_addr) -> torch.Tensor:
    """``ldmatrix.sync.aligned.m8n8.x4.shared.b16`` on a byte array ``smem`` [rows, bytes]:
    lanes 8i..8i+7 give the (row, byte) addresses of the 8 rows (16 bytes each) of matrix i;
    register i of lane l receives bytes 4 (l % 4)..4 (l % 4) + 3 of row l // 4 of matrix i.
    ``row_addr(lane) -> (row, byte)``. Returns uint8 [32 lanes, 4 registers, 4 bytes]."""
    out = torch.zeros(32, 4, 4, dtype=torch.uint8)
    for lane in range(32):
        for i in range(4):
            r, b = row_addr(8 * i + lane // 4)
            out[lane, i] = smem[r, b + 4 * (lane % 4): b + 4 * (lane % 4) + 4]
    return out
