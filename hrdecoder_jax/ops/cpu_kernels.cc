// CPU kernels for XLA (FFI custom calls), built on first use by hrdecoder_jax/ops/library.py (g++, the XLA
// FFI headers that ship with jaxlib, the oneDNN headers and library of the onednn-cpu-gomp wheels); without
// them the model keeps XLA's own operations.
//
// 1. 2-D convolutions through oneDNN: forward, input gradient and weight gradient. XLA's CPU convolutions
//    (YNNPACK) run each convolution on one core, and their weight gradients at 25-50 GFLOP/s; oneDNN, which
//    PyTorch uses on CPUs, runs all three near the machine's peak on every core.
// 2. Batch-norm reductions: per-channel mean and variance of an [M, C] activation, and the two sums of
//    its backward pass, accumulated in double (as PyTorch's CPU batch norm does). XLA rewrites each large
//    float32 reduction into a tree of two kernels (for precision), several hundred per train step: the
//    largest group of kernels it compiles and a seventh of the step's time.
// 3. The optimiser step over every parameter at once (SGD with momentum and coupled weight decay, or
//    AdamW, optax's formulas operation for operation) and the gradient norm: XLA compiles three to five
//    small kernels per parameter tensor for these (about 4,000 of the W18 train step's 7,000).
// 4. Bilinear resizes of NHWC float32 maps by static tables (models/resize.py computes PyTorch's source
//    indices and weights), and their transposes: XLA builds each from padded, shifted slices, hundreds of
//    small kernels per train step.
// 5. A fusion barrier that aliases its operand (ops/fence.py).
//
// Layouts are the model's: activations NHWC, kernels HWIO, float32, all row-major (XLA's default layout
// of a custom call's operands). Attributes: strides (sh, sw) and explicit padding (top, bottom, left,
// right), as lax.conv_general_dilated takes them.
//
// Primitives are created once per shape and kept (creating one JIT-compiles its kernel); every call
// brings its own scratchpad, so two XLA threads may run the same primitive at once.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include <array>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// Convolutions below this many multiply-adds run on one thread (the calling XLA thread): waking oneDNN's
// OpenMP team costs more than it saves there, and XLA runs independent small convolutions (HRNet's parallel
// branches) side by side anyway. Measured on a 2-core Xeon: a 3x3 18->18 convolution at 64x64 (12M
// multiply-adds) takes 0.26 ms on one thread and 0.32 ms on two; 3x3 64->64 at 64x64 (151M) 1.7 vs 1.0 ms;
// the W48 train step at 512 px (branch convolutions of 85M) 1.07-1.11 s with this threshold at 128M against
// 1.14-1.17 s at 48M, the W18 one level.
// HRDECODER_JAX_PARALLEL_MACS overrides the threshold (read once).
int64_t ParallelMacs() {
  static const int64_t value = [] {
    const char* env = std::getenv("HRDECODER_JAX_PARALLEL_MACS");
    return env && *env ? std::atoll(env) : int64_t{128} << 20;
  }();
  return value;
}

using Key = std::array<int64_t, 17>;
struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = 1469598103934665603ull;
    for (int64_t v : k) h = (h ^ static_cast<size_t>(v)) * 1099511628211ull;
    return h;
  }
};

struct Geometry {
  int64_t n, h, w, ci, co, kh, kw, oh, ow, sh, sw, pt, pb, pl, pr;
  int threads() const {
    const int64_t macs = n * oh * ow * co * kh * kw * ci;
    return macs < ParallelMacs() ? 1 : omp_get_num_procs();
  }
  Key key(char kind) const { return {kind, n, h, w, ci, co, kh, kw, oh, ow, sh, sw, pt, pb, pl, pr, threads()}; }
  memory::desc src(tag t = tag::nhwc) const { return memory::desc({n, ci, h, w}, dt::f32, t); }
  memory::desc dst(tag t = tag::nhwc) const { return memory::desc({n, co, oh, ow}, dt::f32, t); }
  memory::desc wei(tag t = tag::hwio) const { return memory::desc({co, ci, kh, kw}, dt::f32, t); }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
};

dnnl::primitive_attr scratchpad_attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc forward_hint(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.src(),
      g.wei(tag::any), g.dst(), g.strides(), g.pad_l(), g.pad_r(), scratchpad_attr());
}

// One convolution primitive with the kernel reorder it needs (the kernel is small; the primitive picks
// its own blocked kernel layout, which is faster than running on HWIO).
struct Entry {
  dnnl::primitive conv;
  memory::desc wei_md;            // the primitive's kernel layout
  memory::desc scratch_md;
  dnnl::reorder wei_reorder;      // HWIO <-> wei_md (direction depends on the kind); empty if equal
  bool reorder = false;
};

std::mutex cache_mutex;
std::unordered_map<Key, std::shared_ptr<Entry>, KeyHash> cache;

// Primitives are created and run with the calling thread's OpenMP thread count set to the geometry's
// (oneDNN plans a primitive's work split for the threads it sees when it is created).
template <typename Make>
std::shared_ptr<Entry> lookup(const Key& key, Make make) {
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto entry = std::make_shared<Entry>(make());
  std::lock_guard<std::mutex> lock(cache_mutex);
  return cache.emplace(key, entry).first->second;
}

std::shared_ptr<Entry> forward_entry(const Geometry& g) {
  return lookup(g.key('f'), [&] {
    auto pd = forward_hint(g);
    Entry e;
    e.conv = dnnl::convolution_forward(pd);
    e.wei_md = pd.weights_desc();
    e.scratch_md = pd.scratchpad_desc();
    e.reorder = e.wei_md != g.wei();
    if (e.reorder) e.wei_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), g.wei(), cpu_engine(), e.wei_md));
    return e;
  });
}

std::shared_ptr<Entry> backward_data_entry(const Geometry& g) {
  return lookup(g.key('d'), [&] {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        cpu_engine(), dnnl::algorithm::convolution_direct, g.src(), g.wei(tag::any), g.dst(), g.strides(),
        g.pad_l(), g.pad_r(), forward_hint(g), scratchpad_attr());
    Entry e;
    e.conv = dnnl::convolution_backward_data(pd);
    e.wei_md = pd.weights_desc();
    e.scratch_md = pd.scratchpad_desc();
    e.reorder = e.wei_md != g.wei();
    if (e.reorder) e.wei_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), g.wei(), cpu_engine(), e.wei_md));
    return e;
  });
}

std::shared_ptr<Entry> backward_weights_entry(const Geometry& g) {
  return lookup(g.key('w'), [&] {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        cpu_engine(), dnnl::algorithm::convolution_direct, g.src(), g.wei(tag::any), g.dst(), g.strides(),
        g.pad_l(), g.pad_r(), forward_hint(g), scratchpad_attr());
    Entry e;
    e.conv = dnnl::convolution_backward_weights(pd);
    e.wei_md = pd.diff_weights_desc();
    e.scratch_md = pd.scratchpad_desc();
    e.reorder = e.wei_md != g.wei();
    if (e.reorder) e.wei_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), e.wei_md, cpu_engine(), g.wei()));
    return e;
  });
}

// Per-thread buffers for the scratchpad and the reordered kernel (XLA may call from several threads).
struct Buffers {
  std::vector<uint8_t> scratch, wei;
  void* get(std::vector<uint8_t>& v, size_t bytes) {
    if (v.size() < bytes) v.resize(bytes);
    return v.data();
  }
};
thread_local Buffers buffers;

dnnl::stream& thread_stream() {
  thread_local dnnl::stream s(cpu_engine());
  return s;
}

Geometry geometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, ffi::Span<const int64_t> y,
                  int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Geometry{x[0], x[1], x[2], x[3], k[3], k[0], k[1], y[1], y[2], sh, sw, pt, pb, pl, pr};
}

ffi::Error run(int kind, void* x, void* k, void* y, const Geometry& g) {
  try {
    omp_set_num_threads(g.threads());
    std::shared_ptr<Entry> e = kind == 'f' ? forward_entry(g) : kind == 'd' ? backward_data_entry(g)
                                                                             : backward_weights_entry(g);
    auto& eng = cpu_engine();
    auto& s = thread_stream();
    memory src(g.src(), eng, x), dst(g.dst(), eng, y), user_wei(g.wei(), eng, k);
    memory scratch(e->scratch_md, eng, buffers.get(buffers.scratch, e->scratch_md.get_size()));
    memory wei = e->reorder ? memory(e->wei_md, eng, buffers.get(buffers.wei, e->wei_md.get_size())) : user_wei;
    if (kind == 'f') {
      if (e->reorder) e->wei_reorder.execute(s, user_wei, wei);
      e->conv.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst},
                          {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (kind == 'd') {
      if (e->reorder) e->wei_reorder.execute(s, user_wei, wei);
      e->conv.execute(s, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DIFF_DST, dst},
                          {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      e->conv.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, wei}, {DNNL_ARG_DIFF_DST, dst},
                          {DNNL_ARG_SCRATCHPAD, scratch}});
      if (e->reorder) e->wei_reorder.execute(s, wei, user_wei);
    }
    s.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> y,
                   int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Geometry g = geometry(x.dimensions(), k.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
  return run('f', x.typed_data(), k.typed_data(), y->typed_data(), g);
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> dx,
                        int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Geometry g = geometry(dx->dimensions(), k.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  return run('d', dx->typed_data(), k.typed_data(), dy.typed_data(), g);
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk,
                           int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Geometry g = geometry(x.dimensions(), dk->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  return run('w', x.typed_data(), dk->typed_data(), dy.typed_data(), g);
}

#define CONV_ATTRS                                                                                    \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb").Attr<int64_t>("pl") \
      .Attr<int64_t>("pr")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HrdConvForward, Forward,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(HrdConvBackwardData, BackwardData,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(HrdConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

namespace {

// ---------------------------------------------------------------------------------------------------
// Batch-norm reductions. x is [M, C] row-major (any leading dimensions flattened); sums run over M for
// every channel, in double, rows in order (deterministic), C channels side by side (vectorised).
// ---------------------------------------------------------------------------------------------------

constexpr int64_t kRowBlock = 256;   // rows summed into a block accumulator before it joins the total

// The training statistics of one batch norm: mean[c] = sum_m x[m, c] / M and the biased variance
// var[c] = sum_m (x[m, c] - mean[c])^2 / M; rstd[c] = 1 / sqrt(var[c] + eps); and the running statistics
// updated as the layer does: momentum * running + (1 - momentum) * batch (the variance unbiased, times
// M / (M - 1)). One pass over x with shifted sums s1 = sum (x - k), s2 = sum (x - k)^2, k = x[0, c]: exact
// enough in double for float32 data (the shift keeps s2 - s1^2 / M well conditioned).
ffi::Error Moments(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> running_mean, ffi::Buffer<ffi::F32> running_var,
                   ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd,
                   ffi::ResultBuffer<ffi::F32> new_mean, ffi::ResultBuffer<ffi::F32> new_var, float eps,
                   float momentum, float one_minus_momentum, float unbias) {
  auto dims = x.dimensions();
  const int64_t c = dims[dims.size() - 1];
  const int64_t m = c ? x.element_count() / c : 0;
  const float* p = x.typed_data();
  std::vector<double> shift(c), s1(c, 0.0), s2(c, 0.0), b1(c), b2(c);
  for (int64_t j = 0; j < c; ++j) shift[j] = m ? p[j] : 0.0;
  for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
    std::fill(b1.begin(), b1.end(), 0.0);
    std::fill(b2.begin(), b2.end(), 0.0);
    const int64_t r1 = std::min(m, r0 + kRowBlock);
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = p + r * c;
      for (int64_t j = 0; j < c; ++j) {
        const double d = static_cast<double>(row[j]) - shift[j];
        b1[j] += d;
        b2[j] += d * d;
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      s1[j] += b1[j];
      s2[j] += b2[j];
    }
  }
  const float* rm = running_mean.typed_data();
  const float* rv = running_var.typed_data();
  float* mu = mean->typed_data();
  float* rs = rstd->typed_data();
  float* nm = new_mean->typed_data();
  float* nv = new_var->typed_data();
  for (int64_t j = 0; j < c; ++j) {
    const double a = m ? s1[j] / m : 0.0;
    const float mean_j = static_cast<float>(shift[j] + a);
    const float var_j = static_cast<float>(m ? std::max(s2[j] / m - a * a, 0.0) : 0.0);
    mu[j] = mean_j;
    rs[j] = 1.0f / std::sqrt(var_j + eps);
    nm[j] = momentum * rm[j] + one_minus_momentum * mean_j;
    nv[j] = momentum * rv[j] + one_minus_momentum * (var_j * unbias);
  }
  return ffi::Error::Success();
}

// sum_dy[c] = sum_m dy[m, c];  sum_dy_xmu[c] = sum_m dy[m, c] * (x[m, c] - mean[c]).
ffi::Error GradSums(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> rstd, ffi::ResultBuffer<ffi::F32> sum_dy,
                    ffi::ResultBuffer<ffi::F32> sum_dy_xmu, ffi::ResultBuffer<ffi::F32> grad_scale) {
  auto dims = x.dimensions();
  const int64_t c = dims[dims.size() - 1];
  const int64_t m = c ? x.element_count() / c : 0;
  const float* g = dy.typed_data();
  const float* p = x.typed_data();
  const float* mu = mean.typed_data();
  std::vector<double> center(mu, mu + c), s1(c, 0.0), s2(c, 0.0), b1(c), b2(c);
  for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
    std::fill(b1.begin(), b1.end(), 0.0);
    std::fill(b2.begin(), b2.end(), 0.0);
    const int64_t r1 = std::min(m, r0 + kRowBlock);
    for (int64_t r = r0; r < r1; ++r) {
      const float* grow = g + r * c;
      const float* xrow = p + r * c;
      for (int64_t j = 0; j < c; ++j) {
        const double d = grow[j];
        b1[j] += d;
        b2[j] += d * (static_cast<double>(xrow[j]) - center[j]);
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      s1[j] += b1[j];
      s2[j] += b2[j];
    }
  }
  float* o1 = sum_dy->typed_data();
  float* o2 = sum_dy_xmu->typed_data();
  float* o3 = grad_scale->typed_data();
  const float* r = rstd.typed_data();
  for (int64_t j = 0; j < c; ++j) {
    o1[j] = static_cast<float>(s1[j]);
    o2[j] = static_cast<float>(s2[j]);
    o3[j] = static_cast<float>(s2[j] * static_cast<double>(r[j]));   // d scale = sum dy * (x - mean) * rstd
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HrdBnMoments, Moments,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>().Attr<float>("eps").Attr<float>("momentum")
                                  .Attr<float>("one_minus_momentum").Attr<float>("unbias"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(HrdBnGradSums, GradSums,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

namespace {

// ---------------------------------------------------------------------------------------------------
// The optimiser step. Arguments: the scalars of this step (f32[]), then per parameter tensor its
// parameter, gradient and state tensors; results: per tensor the new parameter and state tensors (aliased
// onto the arguments: updated in place), then the gradient's global L2 norm (f32[], summed in double).
// Every operation is optax's, in its order, in float32; multiply-adds contract into FMAs as in XLA's
// kernels (-ffp-contract=fast).
// ---------------------------------------------------------------------------------------------------

template <typename Step>
ffi::Error ForEachTensor(ffi::RemainingArgs args, ffi::RemainingRets rets, int scalars, int per_tensor_in,
                         int per_tensor_out, Step step) {
  const int64_t n = (static_cast<int64_t>(args.size()) - scalars) / per_tensor_in;
  if (n * per_tensor_in + scalars != static_cast<int64_t>(args.size()) ||
      n * per_tensor_out + 1 != static_cast<int64_t>(rets.size()))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "optimiser step: operand count");
  std::vector<float> scalar(scalars);
  for (int i = 0; i < scalars; ++i) {
    auto b = args.get<ffi::AnyBuffer>(i);
    if (!b.has_value()) return b.error();
    scalar[i] = *static_cast<const float*>(b->untyped_data());
  }
  std::vector<double> sq(n, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<float*> in(per_tensor_in), out(per_tensor_out);
    int64_t count = -1;
    for (int k = 0; k < per_tensor_in; ++k) {
      auto b = args.get<ffi::AnyBuffer>(scalars + t * per_tensor_in + k);
      if (!b.has_value()) return b.error();
      in[k] = static_cast<float*>(b->untyped_data());
      count = b->element_count();
    }
    for (int k = 0; k < per_tensor_out; ++k) {
      auto r = rets.get<ffi::AnyBuffer>(t * per_tensor_out + k);
      if (!r.has_value()) return r.error();
      out[k] = static_cast<float*>((*r)->untyped_data());
    }
    double acc = 0.0;
    step(scalar.data(), in.data(), out.data(), count, &acc);
    sq[t] = acc;
  }
  double total = 0.0;
  for (double v : sq) total += v;
  auto norm = rets.get<ffi::AnyBuffer>(n * per_tensor_out);
  if (!norm.has_value()) return norm.error();
  *static_cast<float*>((*norm)->untyped_data()) = static_cast<float>(std::sqrt(total));
  return ffi::Error::Success();
}

// optax.chain(add_decayed_weights(wd), sgd(lr, momentum)): g1 = g + wd * p; t = g1 + momentum * t;
// p = p + step * t, with step = -lr(count). Scalars: step. Per tensor in: p, g, t; out: p, t.
ffi::Error SgdStep(ffi::RemainingArgs args, ffi::RemainingRets rets, float wd, float momentum) {
  return ForEachTensor(args, rets, 1, 3, 2, [&](const float* s, float** in, float** out, int64_t n, double* acc) {
    const float step = s[0];
    const float* p = in[0];
    const float* g = in[1];
    const float* t = in[2];
    float* po = out[0];
    float* to = out[1];
    double a = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i];
      a += static_cast<double>(gi) * gi;
      const float g1 = gi + wd * p[i];
      const float tn = g1 + momentum * t[i];
      const float u = step * tn;
      to[i] = tn;
      po[i] = p[i] + u;
    }
    *acc = a;
  });
}

// optax.adamw(lr, b1, b2, eps, eps_root=0, weight_decay=wd): mu = (1 - b1) g + b1 mu;
// nu = (1 - b2) g^2 + b2 nu; u = (mu / c1) / (sqrt(nu / c2 + 0) + eps) with c = 1 - b^count;
// u = u + wd * p; p = p + step * u. Scalars: step, c1, c2. Per tensor in: p, g, mu, nu; out: p, mu, nu.
ffi::Error AdamwStep(ffi::RemainingArgs args, ffi::RemainingRets rets, float b1, float one_minus_b1, float b2,
                     float one_minus_b2, float eps, float wd) {
  return ForEachTensor(args, rets, 3, 4, 3, [&](const float* s, float** in, float** out, int64_t n, double* acc) {
    const float step = s[0], c1 = s[1], c2 = s[2];
    const float* p = in[0];
    const float* g = in[1];
    const float* mu = in[2];
    const float* nu = in[3];
    float* po = out[0];
    float* muo = out[1];
    float* nuo = out[2];
    double a = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i];
      a += static_cast<double>(gi) * gi;
      const float m = one_minus_b1 * gi + b1 * mu[i];
      const float v = one_minus_b2 * (gi * gi) + b2 * nu[i];
      float u = (m / c1) / (std::sqrt(v / c2 + 0.0f) + eps);
      u = u + wd * p[i];
      muo[i] = m;
      nuo[i] = v;
      po[i] = p[i] + step * u;
    }
    *acc = a;
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HrdSgdStep, SgdStep,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets().Attr<float>("wd")
                                  .Attr<float>("momentum"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(HrdAdamwStep, AdamwStep,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets().Attr<float>("b1")
                                  .Attr<float>("one_minus_b1").Attr<float>("b2").Attr<float>("one_minus_b2")
                                  .Attr<float>("eps").Attr<float>("wd"));

namespace {

// A fusion barrier: the result is the operand's buffer (aliased by the caller), nothing is computed. XLA
// cannot fuse across a custom call, so an elementwise producer is computed once into memory instead of being
// copied into every consumer (see models/hrnet.py, fusion_fence).
ffi::Error Identity(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (x.untyped_data() != (*y).untyped_data())
    std::memcpy((*y).untyped_data(), x.untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HrdIdentity, Identity,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

namespace {

// ---------------------------------------------------------------------------------------------------
// Bilinear resize [N, H, W, C] -> [N, OH, OW, C] along H, then W: out[o] = w0[o] * in[i0[o]] + w1[o] *
// in[i1[o]] per axis (the tables of models/resize.py: w0 = 1 - lam, w1 = lam). The transpose adds each
// output's weighted value back into its two sources, outputs in order (deterministic).
// ---------------------------------------------------------------------------------------------------

struct Tables {
  ffi::Span<const int64_t> i0h, i1h, i0w, i1w;
  ffi::Span<const float> w0h, w1h, w0w, w1w;
};

ffi::Error Resize(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> i0h,
                  ffi::Span<const int64_t> i1h, ffi::Span<const float> w0h, ffi::Span<const float> w1h,
                  ffi::Span<const int64_t> i0w, ffi::Span<const int64_t> i1w, ffi::Span<const float> w0w,
                  ffi::Span<const float> w1w) {
  auto d = x.dimensions();
  const int64_t n = d[0], h = d[1], w = d[2], c = d[3];
  const int64_t oh = static_cast<int64_t>(i0h.size()), ow = static_cast<int64_t>(i0w.size());
  const float* in = x.typed_data();
  float* out = y->typed_data();
  std::vector<float> row(w * c);                       // one output row resized along H, all of W
  for (int64_t b = 0; b < n; ++b) {
    const float* img = in + b * h * w * c;
    for (int64_t o = 0; o < oh; ++o) {
      const float* r0 = img + i0h[o] * w * c;
      const float* r1 = img + i1h[o] * w * c;
      const float a = w0h[o], bw = w1h[o];
      for (int64_t k = 0; k < w * c; ++k) row[k] = r0[k] * a + r1[k] * bw;
      float* dst = out + (b * oh + o) * ow * c;
      for (int64_t q = 0; q < ow; ++q) {
        const float* p0 = row.data() + i0w[q] * c;
        const float* p1 = row.data() + i1w[q] * c;
        const float a2 = w0w[q], b2 = w1w[q];
        for (int64_t k = 0; k < c; ++k) dst[q * c + k] = p0[k] * a2 + p1[k] * b2;
      }
    }
  }
  return ffi::Error::Success();
}

ffi::Error ResizeTranspose(ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                           ffi::Span<const int64_t> i0h, ffi::Span<const int64_t> i1h,
                           ffi::Span<const float> w0h, ffi::Span<const float> w1h, ffi::Span<const int64_t> i0w,
                           ffi::Span<const int64_t> i1w, ffi::Span<const float> w0w,
                           ffi::Span<const float> w1w) {
  auto d = dx->dimensions();
  const int64_t n = d[0], h = d[1], w = d[2], c = d[3];
  const int64_t oh = static_cast<int64_t>(i0h.size()), ow = static_cast<int64_t>(i0w.size());
  const float* g = dy.typed_data();
  float* out = dx->typed_data();
  std::fill(out, out + n * h * w * c, 0.0f);
  std::vector<float> row(w * c);
  for (int64_t b = 0; b < n; ++b) {
    float* img = out + b * h * w * c;
    for (int64_t o = 0; o < oh; ++o) {
      std::fill(row.begin(), row.end(), 0.0f);         // the W transpose of output row o
      const float* src = g + (b * oh + o) * ow * c;
      for (int64_t q = 0; q < ow; ++q) {
        float* p0 = row.data() + i0w[q] * c;
        float* p1 = row.data() + i1w[q] * c;
        const float a2 = w0w[q], b2 = w1w[q];
        for (int64_t k = 0; k < c; ++k) {
          p0[k] += src[q * c + k] * a2;
          p1[k] += src[q * c + k] * b2;
        }
      }
      float* r0 = img + i0h[o] * w * c;
      float* r1 = img + i1h[o] * w * c;
      const float a = w0h[o], bw = w1h[o];
      for (int64_t k = 0; k < w * c; ++k) {
        r0[k] += row[k] * a;
        r1[k] += row[k] * bw;
      }
    }
  }
  return ffi::Error::Success();
}

#define RESIZE_ATTRS                                                                                    \
  .Attr<ffi::Span<const int64_t>>("i0h").Attr<ffi::Span<const int64_t>>("i1h")                          \
      .Attr<ffi::Span<const float>>("w0h").Attr<ffi::Span<const float>>("w1h")                          \
      .Attr<ffi::Span<const int64_t>>("i0w").Attr<ffi::Span<const int64_t>>("i1w")                      \
      .Attr<ffi::Span<const float>>("w0w").Attr<ffi::Span<const float>>("w1w")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HrdResize, Resize,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
                                  RESIZE_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(HrdResizeTranspose, ResizeTranspose,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
                                  RESIZE_ATTRS);

// Which oneDNN implementation a shape gets (for diagnostics: a "ref" kernel would be slow).
extern "C" const char* hrd_conv_impl(int kind, const int64_t* d) {
  thread_local std::string out;
  try {
    Geometry g{d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11], d[12], d[13], d[14]};
    auto hint = forward_hint(g);
    if (kind == 'f') out = hint.impl_info_str();
    else if (kind == 'd')
      out = dnnl::convolution_backward_data::primitive_desc(cpu_engine(), dnnl::algorithm::convolution_direct,
          g.src(), g.wei(tag::any), g.dst(), g.strides(), g.pad_l(), g.pad_r(), hint, scratchpad_attr()).impl_info_str();
    else
      out = dnnl::convolution_backward_weights::primitive_desc(cpu_engine(), dnnl::algorithm::convolution_direct,
          g.src(), g.wei(tag::any), g.dst(), g.strides(), g.pad_l(), g.pad_r(), hint, scratchpad_attr()).impl_info_str();
  } catch (const dnnl::error& err) {
    out = std::string("error: ") + err.what();
  }
  return out.c_str();
}
