// Cut cross-entropy extension: shared declarations of the CPU host loop and the CUDA row pass.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace lossbench_cce {

// Arguments of one fused row pass over a block of R rows x V classes.
// The logits block L is overwritten with the gradient with respect to the (raw) logits
// when grads is true, without the one-hot target term (dZ_iy -= ycoef_i), which the host
// applies exactly outside the tiles; loss and lse receive one value per row;
// flags[r * ntiles + t] is set to 1 when tile t of row r must enter the gradient GEMMs (some
// probability >= filt).
struct PassArgs {
  at::Tensor L;                      // (R, V) compute dtype, contiguous
  at::Tensor target;                 // (R) int64: -1 ignored row, [0, V) class, else bad
  c10::optional<at::Tensor> weight;  // (V) class weights or none
  at::Tensor g;                      // (R) per-row scale of the loss gradient
  c10::optional<at::Tensor> dlse;    // (R) gradient arriving at the log-sum-exp output
  at::Tensor loss;                   // (R) out
  at::Tensor lse;                    // (R) out
  at::Tensor flags;                  // (R, ntiles) uint8, zero-initialised
  c10::optional<at::Tensor> lse_in;  // (R) log-sum-exp to normalise with (vocab-parallel)
  c10::optional<at::Tensor> order;   // (V) int64 sorted vocabulary: tile t = order[t*tile ...]
  c10::optional<at::Tensor> rank;    // (V) int64 inverse of order
  at::Tensor bad;                    // (1) int64 out: rows with an out-of-range target
  at::Tensor ycoef;                  // (R) out: coefficient of the one-hot target term of dZ
  double weight_sum = 0.0;           // sum of the class weights (V without weights)
  double label_smoothing = 0.0;
  double softcap = 0.0;              // <= 0: none
  double filter_eps = -1.0;          // <= 0: no filtering
  int64_t tile = 1;
  int64_t ntiles = 1;
  bool grads = false;
};

#ifdef LOSSBENCH_WITH_CUDA
void row_pass_cuda(const PassArgs& a);
#endif

}  // namespace lossbench_cce
