// Fused CPU kernels for the native engine's decode step, built at first use by rollout/cpu_kernels.py.
//
// Why by hand: one decode step of a small model over 64 rows is ~140 eager ATen ops, each costing more in
// dispatch than in arithmetic (an RMS norm of [64, 128]: 27 us for 8 k multiply-adds); torch.compile with
// inductor's C++ wrapper saved ~20 % of a step on benchmarks/rollout.py's long shape (docs/performance.md).
// SGLang's CPU backend (sgl-kernel/csrc/cpu) fuses the same steps, but is built from source for Xeon servers,
// not installable with pip. Matmuls stay ATen's (oneDNN/MKL).
//
// Layouts: activations [rows, features] contiguous; the KV cache per layer is K transposed [rows, KV heads,
// head dim, columns] (a step's scores read each dimension's keys contiguously) and V [rows, KV heads, columns,
// head dim]. Activations and cache share one dtype: float or bfloat16. Math is in float.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  const uint32_t bits = uint32_t(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
template <typename T> inline T from_float(float x) { return x; }
// Rounded to nearest even, NaN kept quiet, as c10::BFloat16(float) rounds; without its branch, so loops vectorize.
template <> inline c10::BFloat16 from_float(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint16_t rounded = uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return c10::BFloat16(x != x ? uint16_t(0x7FC0) : rounded, c10::BFloat16::from_bits());
}

// 16 floats as one GCC/Clang vector (lowered to the machine's SIMD width: one AVX-512 register, two AVX ones, ...),
// so loops keep their sums in registers whatever the compiler's auto-vectorizer decides.
constexpr int64_t kLanes = 16;
using f32x16 = float __attribute__((vector_size(64)));
using f32x16_unaligned = float __attribute__((vector_size(64), aligned(4)));
using u16x16_unaligned = uint16_t __attribute__((vector_size(32), aligned(2)));
using u32x16 = uint32_t __attribute__((vector_size(64)));
inline f32x16 load16(const float* p) { return *reinterpret_cast<const f32x16_unaligned*>(p); }
inline f32x16 load16(const c10::BFloat16* p) {  // bf16 is a float's top half
  const u16x16_unaligned x = *reinterpret_cast<const u16x16_unaligned*>(p);
#if defined(__clang__) || __GNUC__ >= 12
  const u16x16_unaligned zero = {};  // interleaved with zeros as the low halves: one unpack, faster than widening
  return (f32x16)__builtin_shufflevector(zero, x, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25,
                                         10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
#else
  return (f32x16)(__builtin_convertvector(x, u32x16) << 16);
#endif
}
inline void store16(float* p, f32x16 v) { *reinterpret_cast<f32x16_unaligned*>(p) = v; }

// e^x written so loops over it vectorize: 2^n * p(r) with r = x - n ln 2, |r| <= ln 2 / 2, p the degree-7
// Taylor polynomial (relative error < 2e-7); x is clamped to [-87, 88] (e^-87 ~ 1.6e-38 stands in for 0).
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T> void check_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == c10::CppTypeToScalarType<T>::value, name, ": expected ",
              c10::CppTypeToScalarType<T>::value, ", got ", t.scalar_type());
}

// ---- RMS norm: weight * (x * rsqrt(mean(x^2) + eps)), the normalized value rounded to x's dtype first (Qwen's,
// Llama's order) --------------------------------------------------------------------------------------------

template <typename T>
void rms_row(const T* x, const T* weight, T* out, int64_t n, float eps) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < n; ++i) squares += to_float(x[i]) * to_float(x[i]);
  const float scale = 1.f / std::sqrt(squares / n + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    out[i] = from_float<T>(to_float(weight[i]) * to_float(from_float<T>(to_float(x[i]) * scale)));
}

template <typename T>
at::Tensor rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_dtype<T>(weight, "rms_norm weight");
  const at::Tensor input = x.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t n = input.size(-1), rows = input.numel() / n;
  const T* src = input.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_row(src + r * n, wp, dst + r * n, n, float(eps));
  });
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.size(-1) == weight.numel(), "rms_norm: weight has ", weight.numel(), " values for ", x.size(-1));
  if (x.scalar_type() == at::kFloat) return rms_norm_impl<float>(x, weight, eps);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "rms_norm: float or bfloat16, got ", x.scalar_type());
  return rms_norm_impl<c10::BFloat16>(x, weight, eps);
}

// ---- one token's q, k, v: per-head RMS norm (Qwen3), rotary embedding, k and v written to the cache ----------

template <typename T>
at::Tensor decode_qkv_impl(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                           const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                           const at::Tensor& cos_table, const at::Tensor& sin_table,
                           at::Tensor& k_cache, at::Tensor& v_cache, int64_t column, double eps) {
  TORCH_CHECK(q_in.dim() == 2 && k_in.dim() == 2 && v_in.dim() == 2 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "decode_qkv: projections [rows, heads * dim], caches [rows, kv heads, ., .]");
  const int64_t rows = q_in.size(0), kv_heads = k_cache.size(1), dim = k_cache.size(2), width = k_cache.size(3);
  const int64_t heads = q_in.size(1) / dim;
  TORCH_CHECK(q_in.size(1) == heads * dim && k_in.size(1) == kv_heads * dim && v_in.size(1) == kv_heads * dim,
              "decode_qkv: projections do not match the cache's heads");
  TORCH_CHECK(column >= 0 && column < width, "decode_qkv: column ", column, " outside the cache");
  TORCH_CHECK(v_cache.size(2) == width && v_cache.size(3) == dim && k_cache.size(0) == rows, "decode_qkv: cache shapes");
  TORCH_CHECK(dim % 2 == 0 && cos_table.sizes() == at::IntArrayRef({rows, dim / 2}) &&
              sin_table.sizes() == cos_table.sizes(), "decode_qkv: cos and sin must be [rows, head_dim / 2]");
  check_dtype<T>(k_cache, "k cache");
  check_dtype<T>(v_cache, "v cache");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor cos_f = cos_table.to(at::kFloat).contiguous(), sin_f = sin_table.to(at::kFloat).contiguous();
  at::Tensor qn, kn;  // undefined where the model has no per-head norms
  if (q_norm.has_value()) {
    qn = q_norm->contiguous();
    check_dtype<T>(qn, "q_norm weight");
  }
  if (k_norm.has_value()) {
    kn = k_norm->contiguous();
    check_dtype<T>(kn, "k_norm weight");
  }
  at::Tensor out = at::empty({rows, heads, dim}, q.options().dtype(at::kFloat));
  const int64_t half = dim / 2;
  const int64_t k_row = k_cache.stride(0), k_head = k_cache.stride(1);
  const int64_t v_row = v_cache.stride(0), v_head = v_cache.stride(1);
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == width && v_cache.stride(3) == 1 &&
              v_cache.stride(2) == dim, "decode_qkv: the cache must be contiguous per head");
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  const T* qs = q.data_ptr<T>();
  const T* ks = k.data_ptr<T>();
  const T* vs = v.data_ptr<T>();
  const T* q_weight = qn.defined() ? qn.data_ptr<T>() : nullptr;
  const T* k_weight = kn.defined() ? kn.data_ptr<T>() : nullptr;
  const float* cos_all = cos_f.data_ptr<float>();
  const float* sin_all = sin_f.data_ptr<float>();
  float* q_out = out.data_ptr<float>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(dim);
    std::vector<T> normed(dim);
    // Rotates one head of row r (normalized first when a norm weight is given) into `buffer`, in float.
    auto rotate = [&](const T* head, const T* norm_weight, int64_t r) {
      const T* src = head;
      if (norm_weight != nullptr) {
        rms_row(head, norm_weight, normed.data(), dim, float(eps));
        src = normed.data();
      }
      const float* cos = cos_all + r * half;
      const float* sin = sin_all + r * half;
      for (int64_t i = 0; i < half; ++i) {  // both halves of a head share frequency i
        const float a = to_float(src[i]), b = to_float(src[i + half]);
        buffer[i] = a * cos[i] - b * sin[i];
        buffer[i + half] = b * cos[i] + a * sin[i];
      }
    };
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t h = 0; h < heads; ++h) {
        rotate(qs + (r * heads + h) * dim, q_weight, r);
        std::copy(buffer.begin(), buffer.end(), q_out + (r * heads + h) * dim);
      }
      for (int64_t g = 0; g < kv_heads; ++g) {
        rotate(ks + (r * kv_heads + g) * dim, k_weight, r);
        T* kt = kc + r * k_row + g * k_head + column;
        for (int64_t d = 0; d < dim; ++d) kt[d * width] = from_float<T>(buffer[d]);
        std::copy_n(vs + (r * kv_heads + g) * dim, dim, vc + r * v_row + g * v_head + column * dim);
      }
    }
  });
  return out;
}

at::Tensor decode_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                      const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
                      int64_t column, double eps) {
  if (q.scalar_type() == at::kFloat)
    return decode_qkv_impl<float>(q, k, v, q_norm, k_norm, cos, sin, k_cache, v_cache, column, eps);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "decode_qkv: float or bfloat16, got ", q.scalar_type());
  return decode_qkv_impl<c10::BFloat16>(q, k, v, q_norm, k_norm, cos, sin, k_cache, v_cache, column, eps);
}

// The rotary embedding's cos and sin [rows, head_dim / 2] at each row's position, rounded to the activations'
// dtype as the eager path's are (its `_rotary`), in float.
std::tuple<at::Tensor, at::Tensor> rotary_tables(const at::Tensor& positions, const at::Tensor& inv_freq,
                                                 double rope_scale, const at::Tensor& like) {
  const at::Tensor angles = positions.to(at::kFloat).unsqueeze(1) * inv_freq.to(at::kFloat).unsqueeze(0);
  auto rounded = [&](const at::Tensor& t) { return (t * rope_scale).to(like.scalar_type()).to(at::kFloat); };
  return {rounded(angles.cos()), rounded(angles.sin())};
}

// ---- single-token attention over the cache's first `length` columns (key_mask: True = attend) -------------
// One task per (row, KV head): its query heads share each key and value read.

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kKeyBlock = 64;
static_assert(kKeyBlock == 4 * kLanes, "a block is scored as up to four vectors");

// acc[d] = sum over l of p[l] * values[l, d]; Dim > 0 (a multiple of kLanes) fixes the head dim at compile time.
template <typename T, int64_t Dim>
void weighted_sum(const float* __restrict p, const T* __restrict values, int64_t length, float* __restrict acc,
                  int64_t dim = Dim) {
  if constexpr (Dim > 0) {
    constexpr int64_t kVectors = Dim / kLanes;
    // Two keys at a time into two sums: one chain of dependent adds would wait on each add's latency.
    f32x16 sums[2][kVectors] = {};
    int64_t l = 0;
    for (; l + 2 <= length; l += 2) {
      for (int64_t u = 0; u < 2; ++u)
        for (int64_t v = 0; v < kVectors; ++v) sums[u][v] += p[l + u] * load16(values + (l + u) * Dim + v * kLanes);
    }
    for (; l < length; ++l)
      for (int64_t v = 0; v < kVectors; ++v) sums[0][v] += p[l] * load16(values + l * Dim + v * kLanes);
    for (int64_t v = 0; v < kVectors; ++v) store16(acc + v * kLanes, sums[0][v] + sums[1][v]);
  } else {
    std::fill_n(acc, dim, 0.f);
    for (int64_t l = 0; l < length; ++l) {
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) acc[d] += p[l] * to_float(values[l * dim + d]);
    }
  }
}

// block[i] = scale * sum over d of q[d] * keys[d, i] for i < Vectors * kLanes (keys: transposed, `width` apart per
// dimension): the sums stay in registers.
template <typename T, int64_t Vectors>
void score_vectors(const float* q, const T* keys, int64_t width, int64_t dim, float scale, float* __restrict block) {
  f32x16 sums[Vectors] = {};
  for (int64_t d = 0; d < dim; ++d) {
    const float qd = q[d] * scale;
    for (int64_t v = 0; v < Vectors; ++v) sums[v] += qd * load16(keys + d * width + v * kLanes);
  }
  for (int64_t v = 0; v < Vectors; ++v) store16(block + v * kLanes, sums[v]);
}

// The same for n < kLanes keys one at a time (a cache whose width leaves no whole vector).
template <typename T>
void score_keys(const float* q, const T* keys, int64_t width, int64_t dim, float scale, float* __restrict block,
                int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float sum = 0.f;
    for (int64_t d = 0; d < dim; ++d) sum += q[d] * to_float(keys[d * width + i]);
    block[i] = sum * scale;
  }
}

template <typename T>
at::Tensor decode_attention_impl(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& key_mask, int64_t length) {
  const int64_t rows = q_in.size(0), heads = q_in.size(1), dim = q_in.size(2);
  const int64_t kv_heads = k_cache.size(1), width = k_cache.size(3), group = heads / kv_heads;
  TORCH_CHECK(heads % kv_heads == 0 && k_cache.size(0) == rows && k_cache.size(2) == dim && dim <= kMaxHeadDim &&
              v_cache.sizes() == at::IntArrayRef({rows, kv_heads, width, dim}) && length > 0 && length <= width,
              "decode_attention: q, the K cache [rows, kv heads, dim, columns] and V [rows, kv heads, columns, dim] "
              "do not match");
  TORCH_CHECK(key_mask.scalar_type() == at::kBool && key_mask.dim() == 2 && key_mask.size(0) == rows &&
              key_mask.size(1) >= length && key_mask.stride(1) == 1, "decode_attention: key_mask must be bool [rows, "
              "columns]");
  check_dtype<T>(v_cache, "v cache");
  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({rows, heads * dim}, v_cache.options());
  const float scale = 1.f / std::sqrt(float(dim));
  const T* kc = k_cache.data_ptr<T>();
  const T* vc = v_cache.data_ptr<T>();
  const uint8_t* mask = reinterpret_cast<const uint8_t*>(key_mask.data_ptr<bool>());
  const float* queries = q.data_ptr<float>();
  T* outputs = out.data_ptr<T>();
  const int64_t k_row = k_cache.stride(0), k_head = k_cache.stride(1), v_row = v_cache.stride(0);
  const int64_t v_head = v_cache.stride(1), mask_row = key_mask.stride(0);
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(group * length);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, g = task % kv_heads;
      const T* __restrict keys = kc + r * k_row + g * k_head;      // [dim, width]
      const T* __restrict values = vc + r * v_row + g * v_head;    // [width, dim]
      const uint8_t* __restrict m = mask + r * mask_row;
      const float* qg = queries + (r * heads + g * group) * dim;
      float* __restrict scores = buffer.data();
      // Scores in blocks of kKeyBlock keys; a partial block in whole vectors where the cache has the columns (the
      // scores past `length` are computed and dropped), the rest one key at a time.
      for (int64_t l0 = 0; l0 < length; l0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, length - l0);
        const int64_t vectors = std::min((n + kLanes - 1) / kLanes, (width - l0) / kLanes);
        for (int64_t j = 0; j < group; ++j) {
          alignas(64) float block[kKeyBlock];
          const float* qj = qg + j * dim;
          const T* k0 = keys + l0;
          switch (vectors) {
            case 4: score_vectors<T, 4>(qj, k0, width, dim, scale, block); break;
            case 3: score_vectors<T, 3>(qj, k0, width, dim, scale, block); break;
            case 2: score_vectors<T, 2>(qj, k0, width, dim, scale, block); break;
            case 1: score_vectors<T, 1>(qj, k0, width, dim, scale, block); break;
            default: break;
          }
          if (vectors * kLanes < n)
            score_keys<T>(qj, k0 + vectors * kLanes, width, dim, scale, block + vectors * kLanes, n - vectors * kLanes);
          std::copy_n(block, n, scores + j * length + l0);
        }
      }
      for (int64_t j = 0; j < group; ++j) {
        float* __restrict s = scores + j * length;
        float best = -INFINITY;
#pragma omp simd reduction(max : best)
        for (int64_t l = 0; l < length; ++l) best = std::max(best, m[l] ? s[l] : -INFINITY);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t l = 0; l < length; ++l) {
          const float e = m[l] ? exp_approx(s[l] - best) : 0.f;
          s[l] = e;
          total += e;
        }
        alignas(64) float acc[kMaxHeadDim];
        switch (dim) {  // a fixed head dim keeps the sums in registers
          case 32: weighted_sum<T, 32>(s, values, length, acc); break;
          case 64: weighted_sum<T, 64>(s, values, length, acc); break;
          case 128: weighted_sum<T, 128>(s, values, length, acc); break;
          default: weighted_sum<T, 0>(s, values, length, acc, dim);
        }
        T* o = outputs + (r * heads + g * group + j) * dim;
        const float inv = total > 0.f ? 1.f / total : 0.f;  // a row with no key left attends to nothing
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] = from_float<T>(acc[d] * inv);
      }
    }
  });
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& key_mask, int64_t length) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "decode_attention: q [rows, heads, dim], "
              "caches [rows, kv heads, ., .]");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1 && v_cache.stride(2) == q.size(2),
              "decode_attention: the cache must be contiguous per head");
  if (k_cache.scalar_type() == at::kFloat) return decode_attention_impl<float>(q, k_cache, v_cache, key_mask, length);
  TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16, "decode_attention: float or bfloat16, got ",
              k_cache.scalar_type());
  return decode_attention_impl<c10::BFloat16>(q, k_cache, v_cache, key_mask, length);
}

// ---- silu(gate) * up, rounded as the eager ops round ---------------------------------------------------------

template <typename T>
at::Tensor silu_mul_impl(const at::Tensor& gate_in, const at::Tensor& up_in) {
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  check_dtype<T>(up, "silu_mul up");
  at::Tensor out = at::empty_like(gate);
  const T* g = gate.data_ptr<T>();
  const T* u = up.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, gate.numel(), 32768, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float x = to_float(g[i]);
      o[i] = from_float<T>(to_float(from_float<T>(x / (1.f + exp_approx(-x)))) * to_float(u[i]));
    }
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes(), "silu_mul: gate and up differ in shape");
  if (gate.scalar_type() == at::kFloat) return silu_mul_impl<float>(gate, up);
  TORCH_CHECK(gate.scalar_type() == at::kBFloat16, "silu_mul: float or bfloat16, got ", gate.scalar_type());
  return silu_mul_impl<c10::BFloat16>(gate, up);
}

// ---- sampling: Gumbel-max over softmax(logits / temperature) with rollout/sampling.py's noise --------------
// The noise of (seed, step, token) is splitmix64 as in `uniform_noise`; the token is argmax(z - log(-log u)) with
// the same float64 → float32 roundings, so tokens equal the eager path's.

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

inline uint64_t mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline double uniform(uint64_t row_key, int64_t token) {  // uniform_noise's (bits >> 11 + 0.5) / 2^53, exact
  return (double(mix(row_key + uint64_t(token + 1) * kGolden) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

// The eager path's z - log(-log u): float64 logarithms, rounded to float32 before the subtraction.
inline float gumbel_value(float scaled, uint64_t row_key, int64_t token) {
  return scaled - float(std::log(-std::log(uniform(row_key, token))));
}

std::tuple<at::Tensor, at::Tensor> sample_gumbel(const at::Tensor& logits_in, const at::Tensor& seeds_in,
                                                 const at::Tensor& steps_in, double temperature) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.scalar_type() == at::kFloat, "sample_gumbel: float logits [rows, V]");
  TORCH_CHECK(temperature > 0, "sample_gumbel: temperature must be > 0");
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor seeds = seeds_in.to(at::kLong).contiguous(), steps = steps_in.to(at::kLong).contiguous();
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(seeds.numel() == rows && steps.numel() == rows && vocab > 0, "sample_gumbel: one seed and step per row "
              "of a non-empty vocabulary");
  at::Tensor tokens = at::empty({rows}, seeds.options());
  at::Tensor logprobs = at::empty({rows}, logits.options());
  const float temp = float(temperature);
  const float* all_logits = logits.data_ptr<float>();
  const int64_t* seed = seeds.data_ptr<int64_t>();
  const int64_t* step = steps.data_ptr<int64_t>();
  int64_t* chosen_out = tokens.data_ptr<int64_t>();
  float* logprob_out = logprobs.data_ptr<float>();
  // Per row: a vectorized pass flags the tokens whose noise could lift them to the top-logit token's value (a
  // bound with wide margins, in float), then only those get the exact float64 logarithms.
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / vocab),  // a small vocabulary's rows stay on one thread
                   [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(vocab);
    std::vector<uint8_t> flags(vocab);
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict z = all_logits + r * vocab;
      float* __restrict x = scaled.data();
      uint8_t* __restrict candidate = flags.data();
      float top = -INFINITY;
#pragma omp simd reduction(max : top)
      for (int64_t t = 0; t < vocab; ++t) {
        x[t] = z[t] / temp;
        top = std::max(top, x[t]);
      }
      const int64_t argtop = std::find(x, x + vocab, top) - x;
      const uint64_t key = mix(mix(uint64_t(seed[r])) ^ uint64_t(step[r]));
      const float floor = gumbel_value(x[argtop], key, argtop);  // the winner's value is at least this
      const float margin = 1e-3f * (1.f + std::fabs(floor));
      // value_t = x_t - log(-log u_t) >= floor  <=>  u_t >= exp(-exp(x_t - floor))
#pragma omp simd
      for (int64_t t = 0; t < vocab; ++t) {
        const float u = float(uniform(key, t));
        candidate[t] = u >= exp_approx(-exp_approx(x[t] - floor + margin)) * (1.f - 1e-4f);
      }
      candidate[argtop] = 1;
      int64_t chosen = -1;
      float best = -INFINITY;
      for (int64_t t = 0; t < vocab; ++t) {  // in token order: the first of equal values wins, as torch's argmax
        if (!candidate[t]) continue;
        const float value = gumbel_value(x[t], key, t);
        if (chosen < 0 || value > best) best = value, chosen = t;
      }
      float total = 0.f;
#pragma omp simd reduction(+ : total)
      for (int64_t t = 0; t < vocab; ++t) total += exp_approx(x[t] - top);
      chosen_out[r] = chosen;
      logprob_out[r] = float(double(x[chosen]) - double(top) - std::log(double(total)));
    }
  });
  return {tokens, logprobs};
}

// ---- the decoder layers for one token per row: each layer's parameters in `layer_weights` order (lean_decoder.py):
// 0 input norm, 1-2 q (weight, bias), 3-4 k, 5-6 v, 7 q norm, 8 k norm, 9-10 o, 11 post-attention norm, 12-13 gate,
// 14-15 up, 16-17 down; biases and q/k norms None where the model has none ------------------------------------

constexpr int64_t kWeightsPerLayer = 18;

at::Tensor decode_layers(const at::Tensor& x_in, const c10::List<std::optional<at::Tensor>>& weights,
                         at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& positions,
                         const at::Tensor& inv_freq, double rope_scale, const at::Tensor& key_mask, int64_t column,
                         double eps) {
  const int64_t layers = int64_t(k_caches.size());
  TORCH_CHECK(int64_t(weights.size()) == layers * kWeightsPerLayer && int64_t(v_caches.size()) == layers,
              "decode_layers: ", kWeightsPerLayer, " weights and one K and V cache per layer");
  at::Tensor x = x_in;
  const auto [cos, sin] = rotary_tables(positions, inv_freq, rope_scale, x);  // once for every layer
  for (int64_t layer = 0; layer < layers; ++layer) {
    auto w = [&](int64_t i) -> std::optional<at::Tensor> { return weights.get(layer * kWeightsPerLayer + i); };
    auto linear = [&](const at::Tensor& input, int64_t i) { return at::linear(input, *w(i), w(i + 1)); };
    at::Tensor h = rms_norm(x, *w(0), eps);
    at::Tensor q = decode_qkv(linear(h, 1), linear(h, 3), linear(h, 5), w(7), w(8), cos, sin, k_caches[layer],
                              v_caches[layer], column, eps);
    x = x + linear(decode_attention(q, k_caches[layer], v_caches[layer], key_mask, column + 1), 9);
    h = rms_norm(x, *w(11), eps);
    x = x + linear(silu_mul(linear(h, 12), linear(h, 14)), 16);
  }
  return x;
}

// The whole step for one token per row: embedding, the layers, the final norm and the LM head → logits [rows, V].
// With `split_rows`, each thread runs the whole step on its share of the rows (every op of a decode step treats
// rows independently): one parallel region per step instead of one per op. A small model's step is ~40 ops of
// tens of microseconds, and with OpenMP's passive wait (ascend-rl's default) each region costs a wake-up of the
// sleeping threads; the price is that every thread reads all the weights, so the caller splits only models whose
// weights stay in cache (cpu_kernels.ROW_SPLIT_MAX_BYTES).
at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& embedding,
                       const c10::List<std::optional<at::Tensor>>& weights,
                       at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& positions,
                       const at::Tensor& inv_freq, double rope_scale, const at::Tensor& key_mask, int64_t column,
                       const at::Tensor& final_norm, const at::Tensor& lm_head,
                       const std::optional<at::Tensor>& lm_head_bias, double eps, bool split_rows) {
  auto final_hidden = [&](int64_t begin, int64_t end) {  // rows begin … end − 1, before the LM head
    auto part = [&](const at::Tensor& t) { return t.narrow(0, begin, end - begin); };
    std::vector<at::Tensor> ks, vs;
    for (const auto& t : k_caches) ks.push_back(part(t));
    for (const auto& t : v_caches) vs.push_back(part(t));
    const at::Tensor x = decode_layers(at::embedding(embedding, part(ids)), weights, ks, vs, part(positions),
                                       inv_freq, rope_scale, part(key_mask), column, eps);
    return rms_norm(x, final_norm, eps);
  };
  const int64_t rows = ids.size(0);
  if (!split_rows || rows < 2 || at::get_num_threads() < 2)
    return at::linear(final_hidden(0, rows), lm_head, lm_head_bias);
  at::Tensor logits = at::empty({rows, lm_head.size(0)}, embedding.options());
  const at::ThreadLocalState state;  // no_grad and the dispatch state of the caller, for every thread
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    at::Tensor part = logits.narrow(0, begin, end - begin);  // whole rows of a contiguous tensor: written in place
    at::linear_out(part, final_hidden(begin, end), lm_head, lm_head_bias);
  });
  return logits;
}

}  // namespace

TORCH_LIBRARY(ascend_rl_decode, m) {
  m.def("decode_step(Tensor ids, Tensor embedding, Tensor?[] weights, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
        "Tensor positions, Tensor inv_freq, float rope_scale, Tensor key_mask, int column, Tensor final_norm, "
        "Tensor lm_head, Tensor? lm_head_bias, float eps, bool split_rows) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("decode_qkv(Tensor q, Tensor k, Tensor v, Tensor? q_norm, Tensor? k_norm, Tensor cos, Tensor sin, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, int column, float eps) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor key_mask, int length) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("sample_gumbel(Tensor logits, Tensor seeds, Tensor steps, float temperature) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ascend_rl_decode, CPU, m) {
  m.impl("decode_step", &decode_step);
  m.impl("rms_norm", &rms_norm);
  m.impl("decode_qkv", &decode_qkv);
  m.impl("decode_attention", &decode_attention);
  m.impl("silu_mul", &silu_mul);
  m.impl("sample_gumbel", &sample_gumbel);
}
