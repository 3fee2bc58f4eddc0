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
#include <atomic>
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
  const T* lse_in = a.lse_in.has_value() ? a.lse_in->data_ptr<T>() : nullptr;
  const int64_t* order = a.order.has_value() ? a.order->data_ptr<int64_t>() : nullptr;
  const int64_t* rank = a.rank.has_value() ? a.rank->data_ptr<int64_t>() : nullptr;
  T* loss = a.loss.data_ptr<T>();
  T* lse = a.lse.data_ptr<T>();
  T* ycoef = a.grads ? a.ycoef.data_ptr<T>() : nullptr;
  uint8_t* flags = a.flags.data_ptr<uint8_t>();
  const T W = static_cast<T>(a.weight_sum);
  const T ls = static_cast<T>(a.label_smoothing);
  const T cap = static_cast<T>(a.softcap);
  const bool has_cap = a.softcap > 0.0;
  const T filt = static_cast<T>(a.filter_eps);
  const bool filtering = a.filter_eps > 0.0;
  const T log_filt = filtering ? std::log(filt) : T(0);
  const int64_t tile = a.tile;
  const int64_t ntiles = a.ntiles;
  const bool grads = a.grads;
  const T invV = T(1) / static_cast<T>(V);
  std::atomic<int64_t> bad{0};

  // Small blocks run on one thread: waking the pool costs more than the work.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, V));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* x = L + i * V;
      int64_t y = tgt[i];
      const bool is_bad = y < -1 || y >= V;  // bounds check whatever the Python side checked
      if (is_bad) {
        bad.fetch_add(1, std::memory_order_relaxed);
        y = -1;
      }
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
      loss[i] = is_bad ? std::numeric_limits<T>::quiet_NaN()
                : y >= 0 ? (T(1) - ls) * wy * (l - zy) + ls * invV * (W * l - sw) : T(0);
      if (!grads) continue;

      uint8_t* fl = flags + i * ntiles;
      const T gi = g[i];
      const T dl = dlse != nullptr ? dlse[i] : T(0);
      ycoef[i] = T(0);
      if (is_bad || (gi == T(0) && dl == T(0))) {
        std::memset(x, 0, sizeof(T) * V);
        continue;  // flags stay 0: this row needs no tile
      }
      // The normaliser: this row's own log-sum-exp, or the one given (vocab-parallel: global).
      const T lp = lse_in != nullptr ? lse_in[i] : l;
      // The target entry is handled outside the tiles (exactly, by the host): hide it from the
      // filter and the tile products by a stand-in whose probability is ~0.
      if (y >= 0) x[y] = keep_exp ? T(0) : lp - T(100);
      if (order != nullptr && filtering) {
        // Sorted tiles: tile t holds classes order[t*tile ...]. p_j >= filt iff
        // e_j >= filt * exp(lp - m) (kept exponentials) or z_j >= lp + log(filt).
        const T thr = keep_exp ? filt * std::exp(lp - m) : lp + log_filt;
        for (int64_t t = 0; t < ntiles; ++t) {
          const int64_t k1 = std::min(V, (t + 1) * tile);
          for (int64_t k = t * tile; k < k1; ++k) {
            if (x[order[k]] >= thr) {
              fl[t] = 1;
              break;
            }
          }
        }
      }
      const T coef_p = gi * ((T(1) - ls) * wy + ls * invV * W) + dl;
      const T coef_w = gi * ls * invV;
      const T coef_y = gi * (T(1) - ls) * wy;
      const T inv_s = lse_in != nullptr ? std::exp(m - lp) : T(1) / s;
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
            const T p = fast_exp(z - lp);
            pmax = p > pmax ? p : pmax;
            T gv = coef_p * p - coef_w * (w != nullptr ? w[j] : T(1));
            if (has_cap) {
              const T u = z / cap;
              gv *= T(1) - u * u;
            }
            x[j] = gv;
          }
        }
        if (order == nullptr) fl[t] = (!filtering || pmax >= filt) ? 1 : 0;
        else if (!filtering) fl[t] = 1;
      }
      if (y >= 0) {
        // dZ_iy = f (coef_p p_y - coef_w w_y - coef_y) is applied by the host as -ycoef_i.
        T f = T(1);
        if (has_cap) {
          const T u = zy / cap;
          f = T(1) - u * u;
        }
        const T py = std::exp(zy - lp);
        const T wyj = w != nullptr ? w[y] : T(1);
        ycoef[i] = f * (coef_y - coef_p * py + coef_w * wyj);
        x[y] = T(0);
      }
    }
  });
  a.bad.add_(bad.load());
}

void check_input(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t ndim,
                 bool contiguous = true) {
  TORCH_CHECK(t.dim() == ndim, name, " must be ", ndim, "-D, got ", t.sizes());
  TORCH_CHECK(!contiguous || t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

void check_vec(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& like,
               int64_t n, at::ScalarType dtype) {
  if (!t.has_value()) return;
  check_input(*t, name, like, 1);
  TORCH_CHECK(t->size(0) == n, name, " must have ", n, " entries, got ", t->size(0));
  TORCH_CHECK(t->scalar_type() == dtype, name, " must be ", dtype, ", got ", t->scalar_type());
}

bool low_precision(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// Most elements of a float32 piece of C on CPU (16 MiB), whatever V and the row block.
constexpr int64_t kPieceElements = int64_t{1} << 22;

// dst[idx[k]] += src[k] for distinct idx (rows of a sorted run); ATen's CPU index_add_ goes
// row by row through generic ops, about as slow as the GEMM it follows.
template <typename T>
void add_rows_impl(T* d, const int64_t* ix, const T* p, int64_t K, int64_t D) {
  at::parallel_for(0, K, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, D)),
                   [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      T* dr = d + ix[k] * D;
      const T* sr = p + k * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) dr[j] += sr[j];
    }
  });
}

// dst += src for a contiguous bf16/fp16 dst and a contiguous float32 src of the same shape, each
// sum formed in float32 and rounded once -- what dst.add_(src) computes, without the two float32
// temporaries of dst's size that ATen's CPU type promotion makes for it (a float32 copy of dst as
// input and a float32 output that is copied back).
template <typename T>
void add_f32_into_impl(T* d, const float* s, int64_t n) {
  at::parallel_for(0, n, int64_t{1} << 14, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) d[k] = static_cast<T>(static_cast<float>(d[k]) + s[k]);
  });
}

void add_f32_into(at::Tensor dst, const at::Tensor& src) {
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous() && src.scalar_type() == at::kFloat &&
                  dst.sizes() == src.sizes(),
              "add_f32_into: contiguous float32 src of dst's shape expected");
  if (dst.scalar_type() == at::kBFloat16) {
    add_f32_into_impl(dst.data_ptr<at::BFloat16>(), src.data_ptr<float>(), src.numel());
  } else if (dst.scalar_type() == at::kHalf) {
    add_f32_into_impl(dst.data_ptr<at::Half>(), src.data_ptr<float>(), src.numel());
  } else {
    dst.add_(src);
  }
}

void add_rows(at::Tensor& dst, const at::Tensor& idx, const at::Tensor& src) {
  if (dst.is_cuda() || dst.scalar_type() != src.scalar_type() || !dst.is_contiguous() ||
      (dst.scalar_type() != at::kFloat && dst.scalar_type() != at::kDouble)) {
    dst.index_add_(0, idx, src.to(dst.scalar_type()));
    return;
  }
  const at::Tensor s = src.contiguous();
  const at::Tensor ix = idx.contiguous();
  if (dst.scalar_type() == at::kFloat) {
    add_rows_impl<float>(dst.data_ptr<float>(), ix.data_ptr<int64_t>(), s.data_ptr<float>(),
                         s.size(0), s.size(1));
  } else {
    add_rows_impl<double>(dst.data_ptr<double>(), ix.data_ptr<int64_t>(), s.data_ptr<double>(),
                          s.size(0), s.size(1));
  }
}

}  // namespace

// One call computes, for every row, the loss and the log-sum-exp and -- when asked -- the
// gradients with respect to E, C and bias for the per-row upstream scale g (and dlse).
// E (N, D) and C (V, D) may have any strides and be float64, float32, bfloat16 or float16;
// everything else is in the compute dtype (float64 for float64, else float32). Low-precision
// E and C stay in their dtype: on CPU a row block of E and a piece of C (at most about one
// logits block and at most kPieceElements) are converted to float32 at a time into buffers held
// for the whole call, and a low-precision dC is updated a piece at a time through a float32
// piece (beyond the outputs: one logits block, one piece of C and row-block-sized buffers, so
// nothing of size V x D); on CUDA the GEMMs run in the input dtype with float32 output.
// Returns {loss (N), lse (N), dE (N, D) in E's dtype or empty, dC (V, D) (compute dtype if
// accum_c_fp32 or E is not low precision, else C's dtype) or empty, db (V) or empty, skipped
// (row block, tile) pairs, rows with an out-of-range target} (the last two as 0-d int64 CPU
// tensors). On CPU an out-of-range target raises; on CUDA its row's loss is NaN.
std::vector<at::Tensor> run(const at::Tensor& E, const at::Tensor& C,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                            const c10::optional<at::Tensor>& weight, const at::Tensor& g,
                            const c10::optional<at::Tensor>& dlse,
                            const c10::optional<at::Tensor>& lse_in,
                            const c10::optional<at::Tensor>& order, double label_smoothing,
                            double softcap, double filter_eps, int64_t tile, int64_t block_rows,
                            bool need_de, bool need_dc, bool need_db, bool accum_c_fp32) {
  check_input(E, "features", E, 2, false);
  check_input(C, "weight", E, 2, false);
  check_input(target, "target", E, 1);
  check_input(g, "row scale", E, 1);
  const auto in_dt = E.scalar_type();
  TORCH_CHECK(in_dt == at::kFloat || in_dt == at::kDouble || low_precision(in_dt),
              "features must be float64, float32, bfloat16 or float16, got ", in_dt);
  TORCH_CHECK(C.scalar_type() == in_dt, "weight dtype must match features");
  const auto cdt = in_dt == at::kDouble ? at::kDouble : at::kFloat;
  const bool lowp = low_precision(in_dt);
  TORCH_CHECK(g.scalar_type() == cdt, "row scale must be ", cdt);
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64");
  TORCH_CHECK(tile > 0, "chunk_size must be > 0, got ", tile);
  TORCH_CHECK(block_rows > 0, "block_rows must be > 0, got ", block_rows);
  const int64_t N = E.size(0);
  const int64_t D = E.size(1);
  const int64_t V = C.size(0);
  TORCH_CHECK(C.size(1) == D, "weight must have ", D, " columns, got ", C.sizes());
  TORCH_CHECK(target.size(0) == N && g.size(0) == N, "target and row scale need N entries");
  check_vec(bias, "bias", E, V, cdt);
  check_vec(weight, "class_weight", E, V, cdt);
  check_vec(dlse, "lse gradient", E, N, cdt);
  check_vec(lse_in, "lse_in", E, N, cdt);
  check_vec(order, "order", E, V, at::kLong);
  const bool is_cuda = E.is_cuda();
#ifndef LOSSBENCH_WITH_CUDA
  TORCH_CHECK(!is_cuda, "this build of the extension has no CUDA kernels");
#endif
  const bool grads = need_de || need_dc || need_db;
  const auto opts = E.options().dtype(cdt);
  at::Tensor loss = at::empty({N}, opts);
  at::Tensor lse = at::empty({N}, opts);
  at::Tensor dE = need_de ? at::empty({N, D}, E.options()) : at::Tensor();
  const auto dc_dt = (lowp && !accum_c_fp32) ? in_dt : cdt;
  at::Tensor dC = need_dc ? at::zeros({V, D}, E.options().dtype(dc_dt)) : at::Tensor();
  at::Tensor db = need_db ? at::zeros({V}, opts) : at::Tensor();
  const int64_t ntiles = (V + tile - 1) / tile;
  const double weight_sum =
      weight.has_value() ? weight->sum().item<double>() : static_cast<double>(V);
  int64_t skipped = 0;
  at::Tensor bad = at::zeros({1}, E.options().dtype(at::kLong));
  if (N == 0) {
    return {loss, lse, dE, dC, db, at::scalar_tensor(skipped, at::kLong),
            at::scalar_tensor(int64_t{0}, at::kLong)};
  }
  const int64_t RB = std::min(block_rows, N);
  at::Tensor buf = at::empty({RB, V}, opts);
  at::Tensor flags = at::empty({RB, ntiles}, opts.dtype(at::kByte));
  at::Tensor ycoef_buf = at::empty({RB}, opts);
  at::Tensor rank;
  if (order.has_value()) {
    rank = at::empty({V}, order->options());
    rank.index_put_({*order}, at::arange(V, order->options()));
  }
  // Pieces of the vocabulary for the low-precision conversions/products: at most about one
  // logits block (RB x V) of float32 at a time and, on CPU, at most kPieceElements (whatever V),
  // yet at least 256 classes.
  const int64_t Dpos = std::max<int64_t>(1, D);
  const int64_t piece = std::max<int64_t>(
      std::min<int64_t>(V, 256),
      std::min<int64_t>({V, RB * V / Dpos, is_cuda ? V : kPieceElements / Dpos}));
  // CPU, low precision: float32 buffers held for the whole call -- the row block of E (and of
  // its gradient) and one piece of C, which the backward products split between the converted
  // piece of C and the float32 update of the piece of dC (half a piece each) when both are needed.
  const bool cpu_lowp = lowp && !is_cuda;
  const bool dc_lowp = need_dc && dc_dt != cdt;
  const bool split_cbuf = cpu_lowp && need_de && dc_lowp;
  const int64_t cpu_step = split_cbuf ? std::max<int64_t>(1, piece / 2) : piece;
  at::Tensor ebuf = cpu_lowp ? at::empty({RB, D}, opts) : at::Tensor();
  at::Tensor debuf = (cpu_lowp && need_de) ? at::empty({RB, D}, opts) : at::Tensor();
  at::Tensor cbuf = cpu_lowp ? at::empty({std::max(piece, 2 * cpu_step), D}, opts) : at::Tensor();
  // The GEMM helpers: out (R x len, compute dtype) = a (R x D) @ b (len x D)^T, or the
  // gradient products for one class range / index set.
  auto as_c = [&](const at::Tensor& x) { return x.scalar_type() == cdt ? x : x.to(cdt); };

  for (int64_t r0 = 0; r0 < N; r0 += RB) {
    const int64_t R = std::min(RB, N - r0);
    at::Tensor Lb = buf.narrow(0, 0, R);
    const at::Tensor Eb = E.narrow(0, r0, R);
    // float32 copy of the row block (CPU, low precision) or the block itself.
    const at::Tensor Ec = cpu_lowp ? ebuf.narrow(0, 0, R).copy_(Eb) : Eb;
    if (!lowp) {
      if (bias.has_value()) {
        at::addmm_out(Lb, *bias, Eb, C.t());
      } else {
        at::mm_out(Lb, Eb, C.t());
      }
    } else if (is_cuda) {
      at::mm_out(Lb, Eb, C.t(), cdt);  // input-dtype tensor cores, float32 output
      if (bias.has_value()) Lb.add_(*bias);
    } else {
      for (int64_t j0 = 0; j0 < V; j0 += piece) {
        const int64_t len = std::min(piece, V - j0);
        at::Tensor out = Lb.narrow(1, j0, len);
        const at::Tensor Cc = cbuf.narrow(0, 0, len).copy_(C.narrow(0, j0, len));
        if (bias.has_value()) {
          at::addmm_out(out, bias->narrow(0, j0, len), Ec, Cc.t());
        } else {
          at::mm_out(out, Ec, Cc.t());
        }
      }
    }
    at::Tensor fb = flags.narrow(0, 0, R);
    if (grads) fb.zero_();
    PassArgs a;
    a.L = Lb;
    a.target = target.narrow(0, r0, R);
    a.weight = weight;
    a.g = g.narrow(0, r0, R);
    if (dlse.has_value()) a.dlse = dlse->narrow(0, r0, R);
    if (lse_in.has_value()) a.lse_in = lse_in->narrow(0, r0, R);
    a.order = order;
    if (order.has_value()) a.rank = rank;
    a.bad = bad;
    at::Tensor yc = ycoef_buf.narrow(0, 0, R);
    a.ycoef = yc;
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
    } else if (cdt == at::kFloat) {
      row_pass_cpu<float>(a);
    } else {
      row_pass_cpu<double>(a);
    }
    if (!is_cuda) {
      const int64_t nbad = bad.item<int64_t>();
      TORCH_CHECK(nbad == 0, "target values must lie in [0, ", V,
                  ") or equal ignore_index; ", nbad, " row(s) of this block are out of range");
    }
    if (!grads) continue;

    // Which tiles any row of this block needs (filter_eps <= 0 keeps every tile of a live row).
    at::Tensor tile_need = fb.amax(0);
    if (is_cuda) tile_need = tile_need.cpu();
    const uint8_t* tn = tile_need.data_ptr<uint8_t>();
    std::vector<std::pair<int64_t, int64_t>> runs;  // class (or sorted position) ranges
    int64_t kept = 0;
    for (int64_t t = 0; t < ntiles; ++t) kept += tn[t] ? 1 : 0;
    // Sorted tiles are gathered; when over 80 % are kept the plain (exact) products are cheaper.
    const bool gather = order.has_value() && filter_eps > 0.0 && 5 * kept <= 4 * ntiles;
    if (order.has_value() && filter_eps > 0.0 && !gather) {
      if (kept > 0) runs.emplace_back(0, V);
    } else {
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
    }
    if (need_db) db.add_(Lb.sum(0));
    // float32 accumulator of dE for this block (a view of dE when no conversion is needed).
    at::Tensor dEb;
    if (need_de) {
      dEb = cpu_lowp ? debuf.narrow(0, 0, R)
            : lowp   ? at::empty({R, D}, opts)
                     : dE.narrow(0, r0, R);
      dEb.zero_();
    }
    for (const auto& run : runs) {
      // split into pieces (low precision or gathered: bounded temporaries)
      const int64_t step = gather ? std::min<int64_t>(cpu_lowp ? cpu_step : piece, 4096)
                           : cpu_lowp ? cpu_step
                           : lowp     ? piece
                                      : run.second - run.first;
      for (int64_t k0 = run.first; k0 < run.second; k0 += step) {
        const int64_t len = std::min(step, run.second - k0);
        at::Tensor idx, Gs, Cs;
        if (gather) {
          idx = order->narrow(0, k0, len);
          Gs = Lb.index_select(1, idx);
          Cs = C.index_select(0, idx);
        } else {
          Gs = Lb.narrow(1, k0, len);
          Cs = C.narrow(0, k0, len);
        }
        at::Tensor Gm = Gs;  // the operand of the products
        if (lowp && is_cuda) {
          Gm = Gs.to(in_dt);  // tensor cores in the input dtype, float32 output
        } else if (cpu_lowp && need_de) {
          Cs = cbuf.narrow(0, 0, len).copy_(Cs);
        }
        if (need_de) {
          if (lowp && is_cuda) {
            dEb.add_(at::mm(Gm, Cs, cdt));
          } else {
            dEb.addmm_(Gm, Cs);
          }
        }
        if (need_dc) {
          if (!gather && dC.scalar_type() == cdt && !(lowp && is_cuda)) {
            dC.narrow(0, k0, len).addmm_(Gm.t(), Ec);
          } else if (cpu_lowp && dc_lowp) {
            // the float32 piece of dC in cbuf (after the piece of C when that is there too)
            at::Tensor part = cbuf.narrow(0, split_cbuf ? step : 0, len);
            at::mm_out(part, Gm.t(), Ec);
            if (gather) {
              add_rows(dC, idx, part);
            } else {
              add_f32_into(dC.narrow(0, k0, len), part);
            }
          } else {
            at::Tensor part = (lowp && is_cuda) ? at::mm(Gm.t(), Eb, cdt) : at::mm(Gm.t(), Ec);
            if (gather) {
              add_rows(dC, idx, part);
            } else {
              dC.narrow(0, k0, len).add_(part);
            }
          }
        }
      }
    }
    // The one-hot target term, exactly: dZ_iy -= ycoef_i (ycoef is 0 on rows without one).
    const at::Tensor yb = a.target.clamp(0, V - 1);
    if (need_de) dEb.sub_(as_c(C.index_select(0, yb)) * yc.unsqueeze(1));
    if (need_dc) {
      const at::Tensor part = Ec.to(cdt) * (-yc).unsqueeze(1);
      dC.index_add_(0, yb, part.to(dC.scalar_type()));
    }
    if (need_db) db.index_add_(0, yb, -yc);
    if (need_de && lowp) dE.narrow(0, r0, R).copy_(dEb);
  }
  at::Tensor nbad = bad.cpu().reshape({});
  return {loss, lse, dE, dC, db, at::scalar_tensor(skipped, at::kLong), nbad};
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
        py::arg("class_weight"), py::arg("row_scale"), py::arg("dlse"), py::arg("lse_in"),
        py::arg("order"), py::arg("label_smoothing"), py::arg("softcap"), py::arg("filter_eps"),
        py::arg("tile"), py::arg("block_rows"), py::arg("need_de"), py::arg("need_dc"),
        py::arg("need_db"), py::arg("accum_c_fp32"));
  m.def("has_cuda", &lossbench_cce::has_cuda, "whether the CUDA kernels were compiled in");
}
