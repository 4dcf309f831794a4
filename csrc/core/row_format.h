// Wire format of one token row: the payload (hidden elements of the token dtype; FP8 rows:
// hidden e4m3 bytes, then at a 16-byte aligned offset one float32 scale per 128 elements), then,
// at a 16-byte aligned offset, `topk` slots of per-slot metadata. Rows are 16-byte aligned so that
// CUDA kernels can move them with 16-byte vector loads; every path computes sizes here.
#pragma once

#include <cstdint>

#include "fp8.h"

namespace moe_comm {

// Metadata of one top-k slot on the dispatch wire: local expert id (-1 = not for this rank)
// and the router weight.
struct SlotMeta {
  int32_t local_expert;
  float weight;
};

constexpr int64_t kRowAlignBytes = 16;  // one 16-byte vector access per load/store on the GPU

inline int64_t align_up(int64_t value, int64_t align) { return (value + align - 1) / align * align; }

struct RowFormat {
  int64_t payload_bytes = 0;  // hidden * element size
  int64_t scale_offset = 0;   // FP8 rows: byte offset of the float32 scales
  int64_t scale_bytes = 0;    // FP8 rows: 4 * ceil(hidden / 128); else 0
  int64_t meta_offset = 0;    // byte offset of the metadata block
  int64_t meta_bytes = 0;     // topk * bytes per slot (0: no metadata)
  int64_t row_bytes = 0;      // stride between rows

  int64_t meta_end() const { return meta_offset + meta_bytes; }
  bool fp8() const { return scale_bytes > 0; }
  int64_t wire_payload_bytes() const { return payload_bytes + scale_bytes; }  // what stats count
};

// Metadata after the payload (and scales), the row padded to the alignment.
inline RowFormat finish_row_format(RowFormat f, int64_t topk, int64_t meta_bytes_per_slot) {
  f.meta_bytes = topk * meta_bytes_per_slot;
  f.row_bytes = align_up(f.meta_offset + f.meta_bytes, kRowAlignBytes);
  if (f.row_bytes == 0) f.row_bytes = kRowAlignBytes;  // keep a row addressable when H = K = 0
  return f;
}

inline RowFormat make_row_format(int64_t hidden, int64_t elem_size, int64_t topk,
                                 int64_t meta_bytes_per_slot) {
  RowFormat f;
  f.payload_bytes = hidden * elem_size;
  f.meta_offset = align_up(f.payload_bytes, kRowAlignBytes);
  return finish_row_format(f, topk, meta_bytes_per_slot);
}

// FP8 rows: hidden e4m3 bytes, the scales, the metadata.
inline RowFormat make_fp8_row_format(int64_t hidden, int64_t topk, int64_t meta_bytes_per_slot) {
  RowFormat f;
  f.payload_bytes = hidden;
  f.scale_offset = align_up(hidden, kRowAlignBytes);
  f.scale_bytes = fp8_scale_count(hidden) * int64_t(sizeof(float));
  f.meta_offset = align_up(f.scale_offset + f.scale_bytes, kRowAlignBytes);
  return finish_row_format(f, topk, meta_bytes_per_slot);
}

// The dispatch wire's rows, agreed in the header's dtype fact: the token dtype's code, plus
// kFp8Wire when rows travel as FP8, plus kPrequantized when x came quantized (its code is then
// that of the combine's dtype, bfloat16).
constexpr int64_t kFp8Wire = 16, kPrequantized = 32;

inline RowFormat dispatch_row_format(int64_t hidden, int64_t dtype_fact, int64_t topk, int64_t meta_bytes_per_slot) {
  if (dtype_fact & kFp8Wire) return make_fp8_row_format(hidden, topk, meta_bytes_per_slot);
  return make_row_format(hidden, dtype_size(static_cast<DType>(dtype_fact & 15)), topk, meta_bytes_per_slot);
}

}  // namespace moe_comm
