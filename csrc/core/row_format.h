// Wire format of one token row: the payload (hidden elements of the token dtype), then, at a
// 16-byte aligned offset, `topk` slots of per-slot metadata. Rows are 16-byte aligned so that
// CUDA kernels can move them with 16-byte vector loads; every path computes sizes here.
#pragma once

#include <cstdint>

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
  int64_t meta_offset = 0;    // byte offset of the metadata block
  int64_t meta_bytes = 0;     // topk * bytes per slot (0: no metadata)
  int64_t row_bytes = 0;      // stride between rows

  int64_t meta_end() const { return meta_offset + meta_bytes; }
};

inline RowFormat make_row_format(int64_t hidden, int64_t elem_size, int64_t topk,
                                 int64_t meta_bytes_per_slot) {
  RowFormat f;
  f.payload_bytes = hidden * elem_size;
  f.meta_offset = align_up(f.payload_bytes, kRowAlignBytes);
  f.meta_bytes = topk * meta_bytes_per_slot;
  f.row_bytes = align_up(f.meta_offset + f.meta_bytes, kRowAlignBytes);
  if (f.row_bytes == 0) f.row_bytes = kRowAlignBytes;  // keep a row addressable when H = K = 0
  return f;
}

}  // namespace moe_comm
