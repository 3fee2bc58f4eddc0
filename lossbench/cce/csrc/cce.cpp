// Cut cross-entropy (Wijmans et al. 2024, arXiv:2411.09009): host loop and CPU kernels.
//
// The loss is computed block of rows by block of rows. For a block of R rows the R x V logits
// are produced by one GEMM (ATen -> BLAS, all threads), then one fused pass per row (OpenMP via
// at::parallel_for) applies the soft-cap, takes the exact log-sum-exp of the row, the target
// logit and the label-smoothing term, and -- when gradients are wanted -- overwrites the row
// in place with d loss / d logits (softmax minus one-hot, scaled), marking which vocabulary
// tiles hold anything above the filter threshold. The gradient GEMMs dE = G C and
// dC += G^T E then run over the contiguous runs of kept tiles (gradient filtering).
// No N x V tensor is ever held: the block buffer is R x V.

#include "cce.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace lossbench_cce {
namespace {

// exp(x) for float with a Cephes-style polynomial; written so that the compiler vectorises
// the loops that call it (with -fno-trapping-math, which lets it turn the clamps into blends).
// Accurate to about 2 ulp; arguments below -87 return exp(-87).
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick; its low mantissa bits then hold n as an int.
  const float t = x * 1.44269504088896341f + 12582912.0f;
  int32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const float n = t - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (tb - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double fast_exp(double x) { return std::exp(x); }

// cap * tanh(v / cap) through exp, so that it vectorises for float.
inline float softcap_value(float v, float cap) {
  const float y = v / cap;
  const float t = fast_exp(-2.0f * std::fabs(y));
  const float th = (1.0f - t) / (1.0f + t);
  return cap * (y < 0.0f ? -th : th);
}

inline double softcap_value(double v, double cap) { return cap * std::tanh(v / cap); }

template <typename T>
void row_pass_cpu(const PassArgs& a) {
  const int64_t R = a.L.size(0);
  const int64_t V = a.L.size(1);
  T* L = a.L.data_ptr<T>();
  const int64_t* tgt = a.target.data_ptr<int64_t>();
  const T* w = a.weight.has_value() ? a.weight->data_ptr<T>() : nullptr;
  const T* g = a.g.data_ptr<T>();
  const T* dlse = a.dlse.has_value() ? a.dlse->data_ptr<T>() : nullptr;
  T* loss = a.loss.data_ptr<T>();
  T* lse = a.lse.data_ptr<T>();
  uint8_t* flags = a.flags.data_ptr<uint8_t>();
  const T W = static_cast<T>(a.weight_sum);
  const T ls = static_cast<T>(a.label_smoothing);
  const T cap = static_cast<T>(a.softcap);
  const bool has_cap = a.softcap > 0.0;
  const T filt = static_cast<T>(a.filter_eps);
  const bool filtering = a.filter_eps > 0.0;
  const int64_t tile = a.tile;
  const int64_t ntiles = a.ntiles;
  const bool grads = a.grads;
  const T invV = T(1) / static_cast<T>(V);

  // Small blocks run on one thread: waking the pool costs more than the work.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, V));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* x = L + i * V;
      const int64_t y = tgt[i];
      if (has_cap) {
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) x[j] = softcap_value(x[j], cap);
      }
      T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < V; ++j) m = x[j] > m ? x[j] : m;
      T sw = 0;
      if (ls > 0) {
        if (w != nullptr) {
#pragma omp simd reduction(+ : sw)
          for (int64_t j = 0; j < V; ++j) sw += w[j] * x[j];
        } else {
#pragma omp simd reduction(+ : sw)
          for (int64_t j = 0; j < V; ++j) sw += x[j];
        }
      }
      const T zy = y >= 0 ? x[y] : T(0);
      // Without a soft-cap the unnormalised probabilities are kept in place for the gradient.
      const bool keep_exp = grads && !has_cap;
      T s = 0;
      if (keep_exp) {
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < V; ++j) {
          const T e = fast_exp(x[j] - m);
          x[j] = e;
          s += e;
        }
      } else {
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < V; ++j) s += fast_exp(x[j] - m);
      }
      const T l = m + std::log(s);
      lse[i] = l;
      const T wy = y >= 0 ? (w != nullptr ? w[y] : T(1)) : T(0);
      loss[i] = y >= 0 ? (T(1) - ls) * wy * (l - zy) + ls * invV * (W * l - sw) : T(0);
      if (!grads) continue;

      uint8_t* fl = flags + i * ntiles;
      const T gi = g[i];
      const T dl = dlse != nullptr ? dlse[i] : T(0);
      if (gi == T(0) && dl == T(0)) {
        std::memset(x, 0, sizeof(T) * V);
        continue;  // flags stay 0: this row needs no tile
      }
      const T coef_p = gi * ((T(1) - ls) * wy + ls * invV * W) + dl;
      const T coef_w = gi * ls * invV;
      const T coef_y = gi * (T(1) - ls) * wy;
      const T inv_s = T(1) / s;
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t j0 = t * tile;
        const int64_t j1 = std::min(V, j0 + tile);
        T pmax = 0;
        if (keep_exp) {
#pragma omp simd reduction(max : pmax)
          for (int64_t j = j0; j < j1; ++j) {
            const T p = x[j] * inv_s;
            pmax = p > pmax ? p : pmax;
            x[j] = coef_p * p - coef_w * (w != nullptr ? w[j] : T(1));
          }
        } else {
#pragma omp simd reduction(max : pmax)
          for (int64_t j = j0; j < j1; ++j) {
            const T z = x[j];
            const T p = fast_exp(z - l);
            pmax = p > pmax ? p : pmax;
            T gv = coef_p * p - coef_w * (w != nullptr ? w[j] : T(1));
            if (has_cap) {
              const T u = z / cap;
              gv *= T(1) - u * u;
            }
            x[j] = gv;
          }
        }
        fl[t] = (!filtering || pmax >= filt) ? 1 : 0;
      }
      if (y >= 0) {
        T f = T(1);
        if (has_cap) {
          const T u = zy / cap;
          f = T(1) - u * u;
        }
        x[y] -= coef_y * f;
        fl[y / tile] = 1;
      }
    }
  });
}

void check_input(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t ndim) {
  TORCH_CHECK(t.dim() == ndim, name, " must be ", ndim, "-D, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

}  // namespace

// One call computes, for every row, the loss and the log-sum-exp and -- when asked -- the
// gradients with respect to E, C and bias for the per-row upstream scale g (and dlse).
// Returns {loss (N), lse (N), dE (N, D) or empty, dC (V, D) or empty, db (V) or empty,
//          number of skipped (row block, tile) pairs as a 0-d int64 CPU tensor}.
std::vector<at::Tensor> run(const at::Tensor& E, const at::Tensor& C,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                            const c10::optional<at::Tensor>& weight, const at::Tensor& g,
                            const c10::optional<at::Tensor>& dlse, double label_smoothing,
                            double softcap, double filter_eps, int64_t tile, int64_t block_rows,
                            bool need_de, bool need_dc, bool need_db) {
  check_input(E, "features", E, 2);
  check_input(C, "weight", E, 2);
  check_input(target, "target", E, 1);
  check_input(g, "row scale", E, 1);
  TORCH_CHECK(E.scalar_type() == at::kFloat || E.scalar_type() == at::kDouble,
              "features must be float32 or float64 here, got ", E.scalar_type());
  TORCH_CHECK(C.scalar_type() == E.scalar_type(), "weight dtype must match features");
  TORCH_CHECK(g.scalar_type() == E.scalar_type(), "row scale dtype must match features");
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64");
  TORCH_CHECK(tile > 0, "chunk_size must be > 0, got ", tile);
  TORCH_CHECK(block_rows > 0, "block_rows must be > 0, got ", block_rows);
  const int64_t N = E.size(0);
  const int64_t D = E.size(1);
  const int64_t V = C.size(0);
  TORCH_CHECK(C.size(1) == D, "weight must have ", D, " columns, got ", C.sizes());
  TORCH_CHECK(target.size(0) == N && g.size(0) == N, "target and row scale need N entries");
  if (bias.has_value()) {
    check_input(*bias, "bias", E, 1);
    TORCH_CHECK(bias->size(0) == V && bias->scalar_type() == E.scalar_type(), "bad bias");
  }
  if (weight.has_value()) {
    check_input(*weight, "class_weight", E, 1);
    TORCH_CHECK(weight->size(0) == V && weight->scalar_type() == E.scalar_type(), "bad class_weight");
  }
  if (dlse.has_value()) {
    check_input(*dlse, "lse gradient", E, 1);
    TORCH_CHECK(dlse->size(0) == N && dlse->scalar_type() == E.scalar_type(), "bad lse gradient");
  }
  const bool is_cuda = E.is_cuda();
#ifndef LOSSBENCH_WITH_CUDA
  TORCH_CHECK(!is_cuda, "this build of the extension has no CUDA kernels");
#endif
  const bool grads = need_de || need_dc || need_db;
  const auto opts = E.options();
  at::Tensor loss = at::empty({N}, opts);
  at::Tensor lse = at::empty({N}, opts);
  at::Tensor dE = need_de ? at::empty({N, D}, opts) : at::Tensor();
  at::Tensor dC = need_dc ? at::zeros({V, D}, opts) : at::Tensor();
  at::Tensor db = need_db ? at::zeros({V}, opts) : at::Tensor();
  const int64_t ntiles = (V + tile - 1) / tile;
  const double weight_sum =
      weight.has_value() ? weight->sum().item<double>() : static_cast<double>(V);
  int64_t skipped = 0;
  if (N == 0) {
    return {loss, lse, dE, dC, db, at::scalar_tensor(skipped, at::kLong)};
  }
  const int64_t RB = std::min(block_rows, N);
  at::Tensor buf = at::empty({RB, V}, opts);
  at::Tensor flags = at::empty({RB, ntiles}, opts.dtype(at::kByte));
  const at::Tensor Ct = C.t();
  std::vector<uint8_t> need(ntiles);

  for (int64_t r0 = 0; r0 < N; r0 += RB) {
    const int64_t R = std::min(RB, N - r0);
    at::Tensor Lb = buf.narrow(0, 0, R);
    const at::Tensor Eb = E.narrow(0, r0, R);
    if (bias.has_value()) {
      at::addmm_out(Lb, *bias, Eb, Ct);
    } else {
      at::mm_out(Lb, Eb, Ct);
    }
    at::Tensor fb = flags.narrow(0, 0, R);
    if (grads) fb.zero_();
    PassArgs a;
    a.L = Lb;
    a.target = target.narrow(0, r0, R);
    a.weight = weight;
    a.g = g.narrow(0, r0, R);
    if (dlse.has_value()) a.dlse = dlse->narrow(0, r0, R);
    a.loss = loss.narrow(0, r0, R);
    a.lse = lse.narrow(0, r0, R);
    a.flags = fb;
    a.weight_sum = weight_sum;
    a.label_smoothing = label_smoothing;
    a.softcap = softcap;
    a.filter_eps = filter_eps;
    a.tile = tile;
    a.ntiles = ntiles;
    a.grads = grads;
    if (is_cuda) {
#ifdef LOSSBENCH_WITH_CUDA
      row_pass_cuda(a);
#endif
    } else if (E.scalar_type() == at::kFloat) {
      row_pass_cpu<float>(a);
    } else {
      row_pass_cpu<double>(a);
    }
    if (!grads) continue;

    // Which tiles any row of this block needs (filter_eps <= 0 keeps every tile of a live row).
    at::Tensor tile_need = fb.amax(0);
    if (is_cuda) tile_need = tile_need.cpu();
    const uint8_t* tn = tile_need.data_ptr<uint8_t>();
    std::vector<std::pair<int64_t, int64_t>> runs;
    for (int64_t t = 0; t < ntiles; ++t) {
      if (!tn[t]) {
        ++skipped;
        continue;
      }
      const int64_t j0 = t * tile;
      const int64_t j1 = std::min(V, j0 + tile);
      if (!runs.empty() && runs.back().second == j0) {
        runs.back().second = j1;
      } else {
        runs.emplace_back(j0, j1);
      }
    }
    if (need_db) db.add_(Lb.sum(0));
    at::Tensor dEb = need_de ? dE.narrow(0, r0, R) : at::Tensor();
    if (need_de && runs.empty()) dEb.zero_();
    bool first = true;
    for (const auto& run : runs) {
      const int64_t len = run.second - run.first;
      const at::Tensor Gs = Lb.narrow(1, run.first, len);
      if (need_de) {
        const at::Tensor Cs = C.narrow(0, run.first, len);
        if (first) {
          at::mm_out(dEb, Gs, Cs);
        } else {
          dEb.addmm_(Gs, Cs);
        }
      }
      if (need_dc) {
        at::Tensor dCs = dC.narrow(0, run.first, len);
        dCs.addmm_(Gs.t(), Eb);
      }
      first = false;
    }
  }
  return {loss, lse, dE, dC, db, at::scalar_tensor(skipped, at::kLong)};
}

bool has_cuda() {
#ifdef LOSSBENCH_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace lossbench_cce

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lossbench cut cross-entropy kernels (CPU, optionally CUDA)";
  m.def("run", &lossbench_cce::run, "fused chunked linear cross-entropy (loss, lse, grads)",
        py::arg("features"), py::arg("weight"), py::arg("bias"), py::arg("target"),
        py::arg("class_weight"), py::arg("row_scale"), py::arg("dlse"),
        py::arg("label_smoothing"), py::arg("softcap"), py::arg("filter_eps"), py::arg("tile"),
        py::arg("block_rows"), py::arg("need_de"), py::arg("need_dc"), py::arg("need_db"));
  m.def("has_cuda", &lossbench_cce::has_cuda, "whether the CUDA kernels were compiled in");
}
