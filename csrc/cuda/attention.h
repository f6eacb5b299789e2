// Flash-attention forward (FlashAttention-2 order) for pysparse::attention on NVIDIA GPUs.
// Plain CUDA C++: no torch headers. The torch binding fills AttentionParams from tensors, asks
// attention_unsupported() whether this kernel takes the call, and either launches
// pysparse_attention_fwd() or falls back (Triton, then the reference).
//
// Contract (semantics are pysparse/ops/reference.py::attention):
//   q [B, Hq, Sq, D], k / v [B, Hkv, Sk, D], o [B, Hq, Sq, D] (written, never read).
//   * dtype: fp16 or bf16, the same for q, k, v, o. fp32 inputs must go to the fallback.
//   * D (head_dim): 64 or 128 only. Any other head dim must go to the fallback.
//   * Layout: any strides given in ELEMENTS, except that the head-dim stride must be 1 and
//     every other stride of a dimension with size > 1 must be a multiple of 8 elements
//     (16 bytes: whole rows are copied with 16-byte cp.async); q, k, v, o 16-byte aligned.
//     The seq strides must also be <= 2^24 elements (32-bit offsets inside a tile).
//     A tensor that is not so can be made so with .contiguous() by the binding.
//   * Hq % Hkv == 0; query head h reads kv head h / (Hq / Hkv) (grouped-query attention).
//   * causal: bottom-right aligned, query i attends key j iff j <= i + (Sk - Sq).
//   * mask (optional), broadcastable to [B, Hq, Sq, Sk], read element by element through
//     element strides for (batch, query head, query) (0 for a broadcast dimension; the head
//     stride indexes the QUERY head) and a key stride that must be 1 (a mask broadcast along
//     keys, e.g. [B, 1, Sq, 1], must be expanded to Sk and made contiguous, or fall back):
//       kKeepBool  1-byte bool / uint8, non-zero = attend (e.g. key padding [B, 1, 1, Sk]);
//       kAdd{F16,BF16,F32}  additive bias in that dtype, added to q k^T * scale.
//   * scale: the binding passes the final value (reference default 1 / sqrt(D)).
//   * Rows with no key to attend (causal with Sq > Sk, all masked, all -inf bias) give 0;
//     Sk == 0 gives all zeros; Sq == 0 / B == 0 / Hq == 0 launch nothing.
//   * Sizes: B * Hq * ceil(Sq / 64) <= 2^31 - 1 (one CTA each), Sq, Sk < 2^30.
// pysparse_attention_fwd re-checks with attention_unsupported() and returns
// cudaErrorInvalidValue (launching nothing) when the contract is not met.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#if defined(__CUDACC__)
#define PYSPARSE_HD __host__ __device__ __forceinline__
#else
#define PYSPARSE_HD inline
#endif

enum class AttnDType : int32_t { kFloat16 = 0, kBFloat16 = 1 };

enum class AttnMaskKind : int32_t {
  kNone = 0,
  kKeepBool = 1,  // uint8 / bool, non-zero = attend
  kAddF16 = 2,    // additive, fp16
  kAddBF16 = 3,   // additive, bf16
  kAddF32 = 4,    // additive, fp32
};

struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  AttnDType dtype;
  int32_t batch, heads_q, heads_kv, seq_q, seq_k, head_dim;
  // element strides of dims (batch, head, seq); the head-dim stride is 1
  int64_t q_stride_b, q_stride_h, q_stride_s;
  int64_t k_stride_b, k_stride_h, k_stride_s;
  int64_t v_stride_b, v_stride_h, v_stride_s;
  int64_t o_stride_b, o_stride_h, o_stride_s;
  const void* mask;  // nullptr when mask_kind == kNone
  AttnMaskKind mask_kind;
  // element strides of the mask broadcast to [B, Hq, Sq, Sk] (0 = broadcast dimension)
  int64_t mask_stride_b, mask_stride_h, mask_stride_q, mask_stride_k;
  bool causal;
  float scale;
};

// Launch on `stream`. Returns cudaErrorInvalidValue for a call outside the contract (see
// attention_unsupported), otherwise the launch's error (cudaSuccess when it was queued).
cudaError_t pysparse_attention_fwd(const AttentionParams& p, cudaStream_t stream);

namespace pysparse_attention {

// Tiles (why: see attention.cu). One CTA = kBlockM query rows of one (batch, query head),
// kWarps warps of 16 rows each; key/value tiles of kBlockN rows.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kWarps = 4;

// ---- launch geometry and tile skipping. tests/test_cuda_attention.py compiles this header
// ---- with the host compiler and checks these functions against the Python model in
// ---- pysparse/testing/attention_tiles.py and the reference's mask semantics.

PYSPARSE_HD int cdiv(int a, int b) { return (a + b - 1) / b; }

PYSPARSE_HD int floordiv(int a, int b) {  // b > 0, rounds toward -infinity
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// May query row i see key j? (The element predicate of the diagonal and tail tiles.)
PYSPARSE_HD bool key_visible(int i, int j, int seq_q, int seq_k, bool causal) {
  return j < seq_k && (!causal || j <= i + (seq_k - seq_q));
}

// Which key tiles query block `q_block` visits: [0, end). Tiles >= first_masked need the
// per-element predicate (they cross the causal diagonal for some row of the block, or run
// past Sk); tiles below it are visible to every row of the block (rows >= Sq are computed
// but never stored). end == 0: no row of the block sees any key, its output is 0.
struct KeyTiles {
  int end;
  int first_masked;
};

PYSPARSE_HD KeyTiles key_tiles(int q_block, int seq_q, int seq_k, int block_m, int block_n,
                               bool causal) {
  const int n_tiles = cdiv(seq_k, block_n);
  KeyTiles t{n_tiles, seq_k % block_n != 0 ? n_tiles - 1 : n_tiles};
  if (causal) {
    const int shift = seq_k - seq_q;
    const int row_lo = q_block * block_m;
    const int row_hi = (row_lo + block_m < seq_q ? row_lo + block_m : seq_q) - 1;
    const int key_hi = row_hi + shift;  // the last key any stored row of the block sees
    const int end = key_hi < 0 ? 0 : key_hi / block_n + 1;
    const int diag = floordiv(row_lo + shift + 1, block_n);  // tiles < diag: all visible
    t.end = end < n_tiles ? end : n_tiles;
    const int fm = diag > 0 ? diag : 0;
    t.first_masked = fm < t.first_masked ? fm : t.first_masked;
  }
  return t;
}

// CTA blockIdx.x -> (query block, query head, batch). Query blocks of one head are adjacent
// (they share K/V in L2) and run last-block-first, so under causal the longest rows start
// first and the short ones fill the tail of the wave.
struct BlockCoord {
  int q_block, head, batch;
};

PYSPARSE_HD BlockCoord block_coord(int block_idx, int q_blocks, int heads_q) {
  const int bh = block_idx / q_blocks;
  return BlockCoord{q_blocks - 1 - block_idx % q_blocks, bh % heads_q, bh / heads_q};
}

// Number of CTAs (grid.x), as int64 so the caller can check it against 2^31 - 1.
PYSPARSE_HD int64_t num_ctas(int batch, int heads_q, int seq_q, int block_m) {
  return static_cast<int64_t>(batch) * heads_q * cdiv(seq_q, block_m);
}

// nullptr if pysparse_attention_fwd takes `p`, otherwise why not (for the fallback's log).
inline const char* attention_unsupported(const AttentionParams& p) {
  if (p.dtype != AttnDType::kFloat16 && p.dtype != AttnDType::kBFloat16)
    return "dtype must be fp16 or bf16";
  if (p.head_dim != 64 && p.head_dim != 128) return "head_dim must be 64 or 128";
  if (p.batch < 0 || p.heads_q < 0 || p.seq_q < 0 || p.seq_k < 0 || p.heads_kv <= 0)
    return "negative size or no kv head";
  if (p.heads_q % p.heads_kv != 0) return "heads_q must be a multiple of heads_kv";
  if (p.seq_q >= (1 << 30) || p.seq_k >= (1 << 30)) return "sequence length >= 2^30";
  if (num_ctas(p.batch, p.heads_q, p.seq_q, kBlockM) > INT32_MAX) return "grid too large";
  const void* ptrs[4] = {p.q, p.k, p.v, p.o};
  for (const void* ptr : ptrs)
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return "q, k, v, o must be 16-byte aligned";
  const int64_t sizes[3][4] = {{p.batch, p.heads_q, p.seq_q, 0}, {p.batch, p.heads_kv, p.seq_k, 0},
                               {p.batch, p.heads_q, p.seq_q, 0}};
  const int64_t strides[4][3] = {{p.q_stride_b, p.q_stride_h, p.q_stride_s},
                                 {p.k_stride_b, p.k_stride_h, p.k_stride_s},
                                 {p.v_stride_b, p.v_stride_h, p.v_stride_s},
                                 {p.o_stride_b, p.o_stride_h, p.o_stride_s}};
  const int which[4] = {0, 1, 1, 2};  // q, k, v, o -> their sizes
  for (int t = 0; t < 4; ++t)
    for (int d = 0; d < 3; ++d)
      if (sizes[which[t]][d] > 1 && strides[t][d] % 8 != 0)
        return "batch/head/seq strides must be multiples of 8 elements (16 bytes)";
  for (int t = 0; t < 4; ++t)  // in-tile offsets are 32-bit: row * stride_s for row < 64
    if (sizes[which[t]][2] > 1 && (strides[t][2] < 0 || strides[t][2] > (int64_t{1} << 24)))
      return "seq strides must be in [0, 2^24] elements";
  if (p.mask_kind != AttnMaskKind::kNone) {
    if (static_cast<int32_t>(p.mask_kind) < 1 || static_cast<int32_t>(p.mask_kind) > 4)
      return "unknown mask kind";
    if (p.mask == nullptr) return "mask kind set but mask is null";
    if (p.seq_k > 1 && p.mask_stride_k != 1) return "mask key stride must be 1";
  }
  return nullptr;
}

}  // namespace pysparse_attention
