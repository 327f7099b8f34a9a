// fastloop._lstm: the time loop of one LSTM layer in one direction, forward and backward, over raw
// float32 buffers.
//
// Why: at small sizes (hidden 20, batch 30) oneDNN's per-time-step overhead dominates an LSTM
// layer; this loop does only the per-step work: gates[t] = xproj[t] + h_{t-1} @ W_hh^T, the
// activations, and the cell update. The big GEMMs (the input projection, the weight gradients)
// stay in torch, on the Python side (fastloop/step/lstm_kernel.py), which also checks dtype,
// device and contiguity before passing data pointers here. No torch headers: like gather.cpp, it
// builds under pip's build isolation in seconds.
//
// Gate order i, f, g, o (as PyTorch). Layouts, all row-major and contiguous:
//   xproj, gates: (T, B, 4H)   y, cs, tcs: (T, B, H)   h0, c0, hy, cy, dh0, dc0: (B, H)   w_hh: (4H, H)
// "gates" holds the activated gates (sigmoid i, f, o; tanh g), "cs" the cell states and "tcs" their
// tanh: all the backward needs besides c0 and w_hh (tanh is the costliest step of the loop; saving
// it spares the backward its recomputation).
//
// The loops are written so that GCC vectorizes them at -O3 (contiguous inner loops, restrict
// pointers, branch-free exp); exp is our own (glibc's expf is a scalar call per element, which
// would cost as much as oneDNN's whole step).
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace py = pybind11;

namespace {

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
// One build serves every x86-64 CPU: GCC emits an AVX2+FMA clone and a baseline one, and picks at
// load time.
#define FASTLOOP_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define FASTLOOP_CLONES
#endif

// Helpers are forced inline: GCC does not inline plain functions into the AVX2 clone below, and
// an out-of-line call per element stops the loop from vectorizing.
#if defined(__GNUC__)
#define FASTLOOP_INLINE inline __attribute__((always_inline))
#else
#define FASTLOOP_INLINE inline
#endif

FASTLOOP_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

FASTLOOP_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x) for float32, ~1 ulp over the range where the LSTM needs it, with no branches or calls so
// that loops over it vectorize: x = n*ln2 + r with |r| <= ln2/2, exp(r) by its Taylor series to
// r^7 (truncation < 6e-9 relative), 2^n through the exponent bits.
FASTLOOP_INLINE float exp_f32(float x) {
  // no overflow into inf, no denormal results; ternaries (not fmin) so that NaN passes through and
  // the loop still vectorizes
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float shifter = 12582912.0f;            // 1.5 * 2^23: adding it rounds to an integer
  float t = x * 1.44269504f + shifter;
  float n = t - shifter;
  int32_t ni = float_to_bits(t) - float_to_bits(shifter);
  // ln2 split in two so that n * ln2_hi is exact and r keeps its low bits
  float r = (x - n * 0.693359375f) - n * (-2.12194440e-4f);
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bits_to_float((ni + 127) << 23);
}

FASTLOOP_INLINE float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

// tanh: near zero its odd Taylor series to x^9 (|x| < 0.25: truncation < 1e-8 relative), where
// 1 - 2/(exp(2x)+1) would cancel; elsewhere that formula. Both are computed and one is selected,
// which keeps the loop branch-free.
FASTLOOP_INLINE float tanh_f32(float x) {
  float a = std::fabs(x);
  float z = x * x;
  float small = x + x * z * (-1.0f / 3.0f + z * (2.0f / 15.0f + z * (-17.0f / 315.0f + z * (62.0f / 2835.0f))));
  float big = 1.0f - 2.0f / (exp_f32(2.0f * a) + 1.0f);
  big = std::copysign(big, x);
  return a < 0.25f ? small : big;
}

// out[j0, j0 + W) += vec[0, K) @ mat[:, j0, j0 + W), mat (K, ld) row-major. The W sums live in a
// local array of constant size, which GCC keeps in vector registers across the k loop (one load of
// mat and one FMA per vector and k; no load/store of out inside the loop).
template <int W>
FASTLOOP_INLINE void vec_mat_chunk(float* __restrict out, const float* __restrict vec, const float* __restrict mat,
                                   int64_t K, int64_t ld, int64_t j0) {
  float acc[W];
  for (int jj = 0; jj < W; ++jj) acc[jj] = out[j0 + jj];
  for (int64_t k = 0; k < K; ++k) {
    const float a = vec[k];
    const float* __restrict m = mat + k * ld + j0;
    for (int jj = 0; jj < W; ++jj) acc[jj] += a * m[jj];
  }
  for (int jj = 0; jj < W; ++jj) out[j0 + jj] = acc[jj];
}

// out[0, N) += vec[0, K) @ mat, mat (K, N) row-major: the small GEMM of each time step, one batch
// row at a time, in chunks of 32, 16, 8, 4 and 1 columns.
FASTLOOP_INLINE void vec_mat(float* __restrict out, const float* __restrict vec, const float* __restrict mat, int64_t K,
                             int64_t N) {
  int64_t j = 0;
  for (; j + 32 <= N; j += 32) vec_mat_chunk<32>(out, vec, mat, K, N, j);
  if (j + 16 <= N) { vec_mat_chunk<16>(out, vec, mat, K, N, j); j += 16; }
  if (j + 8 <= N) { vec_mat_chunk<8>(out, vec, mat, K, N, j); j += 8; }
  if (j + 4 <= N) { vec_mat_chunk<4>(out, vec, mat, K, N, j); j += 4; }
  for (; j < N; ++j) vec_mat_chunk<1>(out, vec, mat, K, N, j);
}

struct Sizes {
  int64_t T, B, H;
};

// Forward over all time steps. Writes y, hy, cy, gates (activated), cs and tcs.
FASTLOOP_CLONES
void forward_loop(const float* __restrict xproj, const float* __restrict w_hh, const float* __restrict h0,
                  const float* __restrict c0, float* __restrict y, float* __restrict hy, float* __restrict cy,
                  float* __restrict gates, float* __restrict cs, float* __restrict tcs, Sizes s, bool reverse) {
  const int64_t B = s.B, H = s.H, G = 4 * H;
  std::vector<float> wt(static_cast<size_t>(H * G));  // W_hh^T (H, 4H): the inner loop runs over gates
  for (int64_t j = 0; j < G; ++j)
    for (int64_t k = 0; k < H; ++k) wt[k * G + j] = w_hh[j * H + k];
  const float* __restrict w = wt.data();
  const float* h_prev = h0;
  const float* c_prev = c0;
  for (int64_t step = 0; step < s.T; ++step) {
    const int64_t t = reverse ? s.T - 1 - step : step;
    float* __restrict g_t = gates + t * B * G;
    float* __restrict h_t = y + t * B * H;
    float* __restrict c_t = cs + t * B * H;
    float* __restrict tc_t = tcs + t * B * H;
    for (int64_t b = 0; b < B; ++b) {
      float* __restrict g = g_t + b * G;
      const float* __restrict hp = h_prev + b * H;
      std::memcpy(g, xproj + (t * B + b) * G, sizeof(float) * G);
      vec_mat(g, hp, w, H, G);  // g += h_prev[b, :] @ W_hh^T
      for (int64_t j = 0; j < 2 * H; ++j) g[j] = sigmoid_f32(g[j]);  // i, f
      for (int64_t j = 2 * H; j < 3 * H; ++j) g[j] = tanh_f32(g[j]);  // g
      for (int64_t j = 3 * H; j < G; ++j) g[j] = sigmoid_f32(g[j]);  // o
      const float* __restrict cp = c_prev + b * H;
      float* __restrict c = c_t + b * H;
      float* __restrict h = h_t + b * H;
      float* __restrict tc = tc_t + b * H;
      for (int64_t k = 0; k < H; ++k) c[k] = g[H + k] * cp[k] + g[k] * g[2 * H + k];
      for (int64_t k = 0; k < H; ++k) tc[k] = tanh_f32(c[k]);
      for (int64_t k = 0; k < H; ++k) h[k] = g[3 * H + k] * tc[k];
    }
    h_prev = h_t;
    c_prev = c_t;
  }
  std::memcpy(hy, h_prev, sizeof(float) * B * H);
  std::memcpy(cy, c_prev, sizeof(float) * B * H);
}

// Backward from the forward's gates, cs and tcs: the gradient of the pre-activation gates per step
// (dgates, (T, B, 4H)), and of h0 and c0. dW_hh, dW_ih, the bias and input gradients are GEMMs
// over dgates, done by torch.
FASTLOOP_CLONES
void backward_loop(const float* __restrict gates, const float* __restrict cs, const float* __restrict tcs,
                   const float* __restrict c0,
                   const float* __restrict w_hh, const float* __restrict grad_y, const float* __restrict grad_hy,
                   const float* __restrict grad_cy, float* __restrict dgates, float* __restrict dh0,
                   float* __restrict dc0, Sizes s, bool reverse) {
  const int64_t B = s.B, H = s.H, G = 4 * H;
  std::vector<float> dh_buf(grad_hy, grad_hy + B * H);  // dL/dh_t from later steps and hy
  std::vector<float> dc_buf(grad_cy, grad_cy + B * H);  // dL/dc_t from later steps and cy
  float* __restrict dh_next = dh_buf.data();
  float* __restrict dc_next = dc_buf.data();
  for (int64_t step = s.T - 1; step >= 0; --step) {
    const int64_t t = reverse ? s.T - 1 - step : step;
    const int64_t t_prev = reverse ? t + 1 : t - 1;  // the step whose state this one started from
    const float* c_prev_t = step == 0 ? c0 : cs + t_prev * B * H;
    for (int64_t b = 0; b < B; ++b) {
      const float* __restrict g = gates + (t * B + b) * G;
      const float* __restrict tc = tcs + (t * B + b) * H;
      const float* __restrict cp = c_prev_t + b * H;
      const float* __restrict gy = grad_y + (t * B + b) * H;
      float* __restrict dg = dgates + (t * B + b) * G;
      float* __restrict dh = dh_next + b * H;
      float* __restrict dc = dc_next + b * H;
      for (int64_t k = 0; k < H; ++k) {
        const float i = g[k], f = g[H + k], gg = g[2 * H + k], o = g[3 * H + k];
        const float dht = gy[k] + dh[k];
        const float dct = dht * o * (1.0f - tc[k] * tc[k]) + dc[k];
        const float d_o = dht * tc[k];
        dg[k] = dct * gg * i * (1.0f - i);
        dg[H + k] = dct * cp[k] * f * (1.0f - f);
        dg[2 * H + k] = dct * i * (1.0f - gg * gg);
        dg[3 * H + k] = d_o * o * (1.0f - o);
        dc[k] = dct * f;
      }
      for (int64_t k = 0; k < H; ++k) dh[k] = 0.0f;
      vec_mat(dh, dg, w_hh, G, H);  // dh_{t-1}[b, :] = dgates[t, b, :] @ W_hh
    }
  }
  std::memcpy(dh0, dh_next, sizeof(float) * B * H);
  std::memcpy(dc0, dc_next, sizeof(float) * B * H);
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

Sizes check_sizes(int64_t T, int64_t B, int64_t H) {
  if (T < 1 || B < 1 || H < 1) throw py::value_error("lstm: steps, batch and hidden must be >= 1");
  return Sizes{T, B, H};
}

void forward(uintptr_t xproj, uintptr_t w_hh, uintptr_t h0, uintptr_t c0, uintptr_t y, uintptr_t hy, uintptr_t cy,
             uintptr_t gates, uintptr_t cs, uintptr_t tcs, int64_t T, int64_t B, int64_t H, bool reverse) {
  const Sizes s = check_sizes(T, B, H);
  py::gil_scoped_release release;
  forward_loop(ptr<const float>(xproj), ptr<const float>(w_hh), ptr<const float>(h0), ptr<const float>(c0),
               ptr<float>(y), ptr<float>(hy), ptr<float>(cy), ptr<float>(gates), ptr<float>(cs), ptr<float>(tcs), s,
               reverse);
}

void backward(uintptr_t gates, uintptr_t cs, uintptr_t tcs, uintptr_t c0, uintptr_t w_hh, uintptr_t grad_y,
              uintptr_t grad_hy, uintptr_t grad_cy, uintptr_t dgates, uintptr_t dh0, uintptr_t dc0, int64_t T,
              int64_t B, int64_t H, bool reverse) {
  const Sizes s = check_sizes(T, B, H);
  py::gil_scoped_release release;
  backward_loop(ptr<const float>(gates), ptr<const float>(cs), ptr<const float>(tcs), ptr<const float>(c0),
                ptr<const float>(w_hh), ptr<const float>(grad_y), ptr<const float>(grad_hy), ptr<const float>(grad_cy),
                ptr<float>(dgates), ptr<float>(dh0), ptr<float>(dc0), s, reverse);
}

}  // namespace

PYBIND11_MODULE(_lstm, m) {
  m.doc() = "fastloop's LSTM time loop (one layer, one direction) over raw float32 pointers, no GIL.";
  m.attr("ABI_VERSION") = 1;  // bump when the Python-facing signatures change (see _ext.py)
  m.def("forward", &forward, py::arg("xproj"), py::arg("w_hh"), py::arg("h0"), py::arg("c0"), py::arg("y"),
        py::arg("hy"), py::arg("cy"), py::arg("gates"), py::arg("cs"), py::arg("tcs"), py::arg("steps"),
        py::arg("batch"), py::arg("hidden"), py::arg("reverse"),
        "Pointers to contiguous float32 buffers: xproj (T,B,4H), w_hh (4H,H), h0, c0 (B,H) in; "
        "y (T,B,H), hy, cy (B,H), gates (T,B,4H), cs, tcs (T,B,H) out.");
  m.def("backward", &backward, py::arg("gates"), py::arg("cs"), py::arg("tcs"), py::arg("c0"), py::arg("w_hh"),
        py::arg("grad_y"), py::arg("grad_hy"), py::arg("grad_cy"), py::arg("dgates"), py::arg("dh0"), py::arg("dc0"),
        py::arg("steps"), py::arg("batch"), py::arg("hidden"), py::arg("reverse"),
        "Pointers: the forward's gates, cs, tcs, c0, w_hh and the output gradients in; dgates (T,B,4H), "
        "dh0, dc0 (B,H) out.");
}
