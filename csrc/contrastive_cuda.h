// Launchers of the CUDA kernels (csrc/contrastive_cuda.cu). Plain pointers and sizes only, so
// that the .cu file needs no torch headers; csrc/contrastive_cuda_host.cpp wraps them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace suncet::cuda {

constexpr int kTile = 64;      // rows and columns of every tile
constexpr int kMaxDim = 256;   // widest D the kernels are instantiated for

// Keys [rows, sets] and groups of both sides, and where row i's own column is.
struct Attributes {
  const int64_t* row_keys;
  const int64_t* col_keys;
  const int64_t* row_groups;
  const int64_t* col_groups;
  int64_t rows;
  int64_t cols;
  int sets;
  int64_t self_offset;
};

struct ForwardArgs {
  const void* q;  // bf16 [rows, dim]
  const void* k;  // bf16 [cols, dim]
  int dim;
  Attributes at;
  float tau;
  int splits;                // column splits; partial holds [splits][2 + 2 sets][rows]
  float* partial;
  int64_t* col_tile_range;   // workspace [2][cdiv(cols, kTile)]
  float* loss;               // [rows, sets]
  bool* valid;               // [rows, sets]
  float* lse_all;            // [rows]
  float* lse_pos;            // [rows, sets]
};

struct BackwardArgs {
  const float* grad;         // [rows, sets]
  const float* lse_all;
  const float* lse_pos;
  float* tables;             // workspace [2 * 2^sets][rows]
  int64_t* tile_ranges;      // workspace [4][cdiv(max(rows, cols), kTile)]
  const void* q;
  const void* k;
  void* dq;
  void* dk;                  // unused with one_tower
  int dim;
  bool one_tower;
  Attributes at;
  float tau;
};

// Column splits that give the forward about two blocks per multiprocessor.
int forward_splits(int64_t rows, int64_t cols, int multiprocessors);

cudaError_t launch_forward(const ForwardArgs& args, cudaStream_t stream);
cudaError_t launch_backward(const BackwardArgs& args, cudaStream_t stream);

}  // namespace suncet::cuda
