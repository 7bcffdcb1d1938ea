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
//
// Layouts are the model's: activations NHWC, kernels HWIO, float32, all row-major (XLA's default layout
// of a custom call's operands). Attributes: strides (sh, sw) and explicit padding (top, bottom, left,
// right), as lax.conv_general_dilated takes them.
//
// Primitives are created once per shape and kept (creating one JIT-compiles its kernel); every call
// brings its own scratchpad, so two XLA threads may run the same primitive at once.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

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

struct Geometry {
  int64_t n, h, w, ci, co, kh, kw, oh, ow, sh, sw, pt, pb, pl, pr;
  std::string key(char kind) const {
    std::string k(1, kind);
    for (int64_t v : {n, h, w, ci, co, kh, kw, oh, ow, sh, sw, pt, pb, pl, pr}) {
      k += ',';
      k += std::to_string(v);
    }
    return k;
  }
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
std::unordered_map<std::string, std::shared_ptr<Entry>> cache;

template <typename Make>
std::shared_ptr<Entry> lookup(const std::string& key, Make make) {
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

ffi::Error run(const std::shared_ptr<Entry>& e, int kind, void* x, void* k, void* y, const Geometry& g) {
  try {
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
  return run(forward_entry(g), 'f', x.typed_data(), k.typed_data(), y->typed_data(), g);
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> dx,
                        int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Geometry g = geometry(dx->dimensions(), k.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  return run(backward_data_entry(g), 'd', dx->typed_data(), k.typed_data(), dy.typed_data(), g);
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk,
                           int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  Geometry g = geometry(x.dimensions(), dk->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  return run(backward_weights_entry(g), 'w', x.typed_data(), dk->typed_data(), dy.typed_data(), g);
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

// mean[c] = sum_m x[m, c] / M;  var[c] = sum_m (x[m, c] - mean[c])^2 / M  (the biased variance).
// One pass over x with shifted sums: s1 = sum (x - k), s2 = sum (x - k)^2 with k = x[0, c]; exact enough
// in double for float32 data (the shift keeps the difference s2 - s1^2/M well conditioned).
ffi::Error Moments(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var) {
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
  float* mu = mean->typed_data();
  float* v = var->typed_data();
  for (int64_t j = 0; j < c; ++j) {
    const double a = m ? s1[j] / m : 0.0;
    mu[j] = static_cast<float>(shift[j] + a);
    v[j] = static_cast<float>(m ? std::max(s2[j] / m - a * a, 0.0) : 0.0);
  }
  return ffi::Error::Success();
}

// sum_dy[c] = sum_m dy[m, c];  sum_dy_xmu[c] = sum_m dy[m, c] * (x[m, c] - mean[c]).
ffi::Error GradSums(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean,
                    ffi::ResultBuffer<ffi::F32> sum_dy, ffi::ResultBuffer<ffi::F32> sum_dy_xmu) {
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
  for (int64_t j = 0; j < c; ++j) {
    o1[j] = static_cast<float>(s1[j]);
    o2[j] = static_cast<float>(s2[j]);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HrdBnMoments, Moments,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(HrdBnGradSums, GradSums,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

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
