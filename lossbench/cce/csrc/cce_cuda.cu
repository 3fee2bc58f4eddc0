// Cut cross-entropy (Wijmans et al. 2024, arXiv:2411.09009): the fused CUDA row pass.
//
// One thread block per row of the R x V logits block (the GEMMs around it are cuBLAS calls made
// by the host loop in cce.cpp). The pass applies the soft-cap, reduces the row to its max, the
// label-smoothing sum and the exact log-sum-exp, writes loss and lse, and -- when gradients are
// wanted -- overwrites the row with d loss / d logits and marks the vocabulary tiles that hold a
// probability >= filter_eps or the row's target (gradient filtering).

#include "cce.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

namespace lossbench_cce {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    const T u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

// Block-wide reductions; every thread gets the result. shm holds kThreads / 32 values.
template <typename T>
__device__ T block_sum(T v, T* shm) {
  const int lane = threadIdx.x & 31;
  const int wid = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shm[wid] = v;
  __syncthreads();
  T r = lane < (kThreads / 32) ? shm[lane] : T(0);
  return warp_sum(r);
}

template <typename T>
__device__ T block_max(T v, T* shm) {
  const int lane = threadIdx.x & 31;
  const int wid = threadIdx.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shm[wid] = v;
  __syncthreads();
  T r = lane < (kThreads / 32) ? shm[lane] : -INFINITY;
  return warp_max(r);
}

template <typename T>
__global__ void row_pass_kernel(T* __restrict__ L, int64_t V, const int64_t* __restrict__ tgt,
                                const T* __restrict__ w, const T* __restrict__ g,
                                const T* __restrict__ dlse, T* __restrict__ loss,
                                T* __restrict__ lse, uint8_t* __restrict__ flags, T W, T ls,
                                T cap, T filt, int64_t tile, int64_t ntiles, bool grads,
                                const T* __restrict__ lse_in, const int64_t* __restrict__ rank,
                                unsigned long long* __restrict__ bad, T* __restrict__ ycoef) {
  __shared__ T shm[kThreads / 32];
  const int64_t i = blockIdx.x;
  T* x = L + i * V;
  int64_t y = tgt[i];
  // Bounds check whatever the Python side checked: such a row gets a NaN loss and gradient.
  const bool is_bad = y < -1 || y >= V;
  if (is_bad) {
    if (threadIdx.x == 0) atomicAdd(bad, 1ull);
    y = -1;
  }
  const bool has_cap = cap > T(0);

  T m = -INFINITY;
  T sw = T(0);
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    T v = x[j];
    if (has_cap) {
      v = cap * tanh(v / cap);
      x[j] = v;
    }
    m = v > m ? v : m;
    if (ls > T(0)) sw += (w != nullptr ? w[j] : T(1)) * v;
  }
  m = block_max(m, shm);
  if (ls > T(0)) sw = block_sum(sw, shm);
  T s = T(0);
  for (int64_t j = threadIdx.x; j < V; j += kThreads) s += exp(x[j] - m);
  s = block_sum(s, shm);
  const T l = m + log(s);
  const T zy = y >= 0 ? x[y] : T(0);  // every thread reads before any thread writes below
  const T wy = y >= 0 ? (w != nullptr ? w[y] : T(1)) : T(0);
  const T invV = T(1) / static_cast<T>(V);
  if (threadIdx.x == 0) {
    lse[i] = l;
    loss[i] = is_bad ? T(NAN)
              : y >= 0 ? (T(1) - ls) * wy * (l - zy) + ls * invV * (W * l - sw) : T(0);
  }
  if (!grads) return;
  __syncthreads();

  const T gi = g[i];
  const T dl = dlse != nullptr ? dlse[i] : T(0);
  if (is_bad || (gi == T(0) && dl == T(0))) {
    if (threadIdx.x == 0) ycoef[i] = T(0);
  }
  if (is_bad) {
    for (int64_t j = threadIdx.x; j < V; j += kThreads) x[j] = T(NAN);
    if (threadIdx.x == 0) {
      for (int64_t t = 0; t < ntiles; ++t) flags[i * ntiles + t] = 1;
    }
    return;
  }
  if (gi == T(0) && dl == T(0)) {
    for (int64_t j = threadIdx.x; j < V; j += kThreads) x[j] = T(0);
    return;
  }
  const T coef_p = gi * ((T(1) - ls) * wy + ls * invV * W) + dl;
  const T coef_w = gi * ls * invV;
  const T coef_y = gi * (T(1) - ls) * wy;
  const bool filtering = filt > T(0);
  uint8_t* fl = flags + i * ntiles;
  const T lp = lse_in != nullptr ? lse_in[i] : l;  // vocab-parallel: the global log-sum-exp
  if (threadIdx.x == 0) {  // the target entry is applied by the host, outside the tiles
    T f = T(1);
    if (has_cap) {
      const T u = zy / cap;
      f = T(1) - u * u;
    }
    const T wyj = w != nullptr ? w[y >= 0 ? y : 0] : T(1);
    ycoef[i] = y >= 0 ? f * (coef_y - coef_p * exp(zy - lp) + coef_w * wyj) : T(0);
  }
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const T z = x[j];
    const T p = exp(z - lp);
    T gv = coef_p * p - coef_w * (w != nullptr ? w[j] : T(1));
    if (has_cap) {
      const T u = z / cap;
      gv *= T(1) - u * u;
    }
    if (j == y) {  // the target entry: applied by the host (ycoef)
      x[j] = T(0);
      continue;
    }
    x[j] = gv;
    if (!filtering || p >= filt) {  // benign race: all write 1
      fl[(rank != nullptr ? rank[j] : j) / tile] = 1;
    }
  }
}

}  // namespace

void row_pass_cuda(const PassArgs& a) {
  const c10::cuda::CUDAGuard guard(a.L.device());
  const int64_t R = a.L.size(0);
  const int64_t V = a.L.size(1);
  if (R == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* rank = a.rank.has_value() ? a.rank->data_ptr<int64_t>() : nullptr;
  auto* bad = reinterpret_cast<unsigned long long*>(a.bad.data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES(a.L.scalar_type(), "lossbench_cce_row_pass", [&] {
    row_pass_kernel<scalar_t><<<static_cast<unsigned>(R), kThreads, 0, stream>>>(
        a.L.data_ptr<scalar_t>(), V, a.target.data_ptr<int64_t>(),
        a.weight.has_value() ? a.weight->data_ptr<scalar_t>() : nullptr,
        a.g.data_ptr<scalar_t>(), a.dlse.has_value() ? a.dlse->data_ptr<scalar_t>() : nullptr,
        a.loss.data_ptr<scalar_t>(), a.lse.data_ptr<scalar_t>(), a.flags.data_ptr<uint8_t>(),
        static_cast<scalar_t>(a.weight_sum), static_cast<scalar_t>(a.label_smoothing),
        static_cast<scalar_t>(a.softcap), static_cast<scalar_t>(a.filter_eps), a.tile, a.ntiles,
        a.grads, a.lse_in.has_value() ? a.lse_in->data_ptr<scalar_t>() : nullptr, rank, bad,
        a.ycoef.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lossbench_cce
