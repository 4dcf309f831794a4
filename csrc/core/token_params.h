// Parameters of the token kernels, shared by the CPU kernels (csrc/cpu/token_ops.h) and their
// CUDA twins (csrc/kernels/launchers.h): one contract, two backends. Raw pointers, byte strides.
#pragma once

#include <cstdint>

#include "dtype.h"
#include "row_format.h"

namespace moe_comm {

// Copies each send slot's token row into the send buffer; with topk_idx set, also writes the
// SlotMeta block (local expert on the slot's destination rank, else -1; weight or 1).
struct PackParams {
  const uint8_t* src = nullptr;  // [num_tokens, src_stride bytes]; may be null when payload 0
  int64_t src_stride = 0;
  const int64_t* send_token = nullptr;    // [num_rows]
  const int64_t* send_offsets = nullptr;  // [num_ranks + 1]; num_rows = send_offsets[num_ranks]
  int64_t num_ranks = 0;
  int64_t num_rows = 0;
  uint8_t* dst = nullptr;  // [num_rows, fmt.row_bytes]
  RowFormat fmt;
  const int64_t* topk_idx = nullptr;      // [num_tokens, topk]; null: no metadata
  const float* topk_weights = nullptr;    // [num_tokens, topk]; null: weight 1
  int64_t topk = 0;
  int64_t experts_per_rank = 1;
  // FP8 rows (fmt.fp8()): src holds rows of `quantize_from` quantized here (quantize), or e4m3
  // bytes whose float32 scales are rows of `scales` (scales_stride bytes apart), copied as they
  // are (pre-quantized input, or rows a forwarder passes on).
  bool quantize = false;
  DType quantize_from = DType::kFloat32;
  const uint8_t* scales = nullptr;
  int64_t scales_stride = 0;
};

// dst[row_map[i, k]] = weight[i, k] * src[i] (a plain byte copy when weights is null).
struct ScatterParams {
  const uint8_t* src = nullptr;
  int64_t src_stride = 0;
  int64_t num_src = 0;
  const int64_t* row_map = nullptr;  // [num_src, topk]
  const float* weights = nullptr;    // [num_src, topk] or null
  int64_t topk = 0;
  int64_t hidden = 0;
  DType dtype = DType::kFloat32;  // of src and dst
  uint8_t* dst = nullptr;
  int64_t dst_stride = 0;
  // FP8 source rows (fp8_scale_offset >= 0: hidden e4m3 bytes, their float32 scales at that
  // byte offset of the row; no weights): dequantized into `dtype` rows, or with scales_dst set,
  // the bytes and the scales copied as they are (dst then has hidden bytes per row).
  int64_t fp8_scale_offset = -1;
  uint8_t* scales_dst = nullptr;
  int64_t scales_dst_stride = 0;
};

// dst[i] = sum over k with map[i, k] >= 0 of weight[i, k] * src[map[i, k]], in float32 (k in
// order); rows with no valid slot become zeros.
struct ReduceParams {
  const uint8_t* src = nullptr;
  int64_t src_stride = 0;
  DType src_dtype = DType::kFloat32;
  const int64_t* map = nullptr;      // [num_out, topk]
  const float* weights = nullptr;    // [num_out, topk] or null (weight 1)
  int64_t num_out = 0;
  int64_t topk = 0;
  int64_t hidden = 0;
  uint8_t* dst = nullptr;
  int64_t dst_stride = 0;
  DType dst_dtype = DType::kFloat32;
  // Optional per-slot scalars [num_out, topk] float32 that ride in each output row, at byte
  // offset scalars_offset (router-weight gradients on the backward wire): no separate pass.
  const float* scalars = nullptr;
  int64_t scalars_offset = 0;
};

// out[i, k] = dot(a[i], b[map[i, k]]) in float32; 0 where map < 0. The gradient of a
// combine weight.
struct DotParams {
  const uint8_t* a = nullptr;
  int64_t a_stride = 0;
  DType a_dtype = DType::kFloat32;
  const uint8_t* b = nullptr;
  int64_t b_stride = 0;
  DType b_dtype = DType::kFloat32;
  const int64_t* map = nullptr;  // [num_rows, topk]
  int64_t num_rows = 0;
  int64_t topk = 0;
  int64_t hidden = 0;
  float* out = nullptr;  // [num_rows, topk]
};

}  // namespace moe_comm
