// lightning_gf's own depthwise conv: see depthwise_conv.h. Output rows are made eight
// columns at a time straight from the input plane: a tap's lanes that fall left or right
// of the map are masked to zero, its rows above or below the map read a row of zeros. Maps
// up to kStripMaxWidth wide with 3x3 kernels go down strips of eight columns, each input
// row loaded once for the three output rows that read it; wider maps go in blocks of four
// rows side by side (four independent chains of multiply-adds). (A zero-padded copy of
// each plane cost more than the conv on 7x7 maps: every load of the copy straddled two of
// the stores that had just made it.)

#include "depthwise_conv.h"
#include "patch_kernels.h"
#include "plane_store.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LIGHTNING_GF_OWN_DEPTHWISE 1
#else
#define LIGHTNING_GF_OWN_DEPTHWISE 0
#endif

namespace lightning_gf {
namespace {

constexpr int64_t kLanes = 8;  // float32 lanes of an AVX2 register
constexpr int kRows = 4;       // output rows made side by side
constexpr int64_t kMaxPadding = 4;
constexpr int64_t kBandRows = 16;  // output rows per band of convolve_strip3
constexpr int64_t kStripMaxWidth = 16;  // wider maps: convolve_block (faster from 28 columns, measured)

#if LIGHTNING_GF_OWN_DEPTHWISE
// One plane's conv: where it reads and writes, and the geometry.
struct PlaneConv {
  const float* map;    // the input plane, h x w
  const float* zeros;  // a row of zeros, readable from zeros[-pad_w] to past the last tap
  float* y;            // the output plane, out_h x out_w
  int64_t h, w, out_h, out_w, pad_h, pad_w, dil_h, dil_w;
  const int32_t* lanes;   // per output chunk and kernel column: -1 for a lane that reads inside the row
  const uint8_t* inside;  // per output chunk: every lane of every kernel column reads inside the row
  bool may_overread;      // plain loads may read outside the row: the plane is not at an end of the tensor
};

#if defined(__GNUC__)
#define LIGHTNING_GF_INLINE inline __attribute__((always_inline))
#else
#define LIGHTNING_GF_INLINE inline
#endif

// Output rows [i, i + R) at columns [8 * chunk, 8 * chunk + 8): the bias, then each tap's
// product by a fused multiply-add, the kernel's rows top to bottom, each left to right.
// src[kh][r]: the input row that kernel row kh of output row i + r reads, at column
// -pad_w.
template <int K, int R>
LIGHTNING_GF_INLINE void convolve_chunk(const PlaneConv& p, const float* const (&src)[K][R], const __m256 (&taps)[K * K],
                                        __m256 bias, int64_t i, int64_t chunk) {
  const int64_t j = chunk * kLanes;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = bias;
  if (p.inside[chunk]) {
    for (int kh = 0; kh < K; ++kh)
      for (int kw = 0; kw < K; ++kw)
        for (int r = 0; r < R; ++r)
          acc[r] = _mm256_fmadd_ps(taps[kh * K + kw], _mm256_loadu_ps(src[kh][r] + j + kw * p.dil_w), acc[r]);
  } else if (p.may_overread) {
    for (int kh = 0; kh < K; ++kh)
      for (int kw = 0; kw < K; ++kw) {
        const __m256 keep = _mm256_loadu_ps(reinterpret_cast<const float*>(p.lanes + (chunk * K + kw) * kLanes));
        for (int r = 0; r < R; ++r)
          acc[r] = _mm256_fmadd_ps(taps[kh * K + kw],
                                   _mm256_and_ps(_mm256_loadu_ps(src[kh][r] + j + kw * p.dil_w), keep), acc[r]);
      }
  } else {
    for (int kh = 0; kh < K; ++kh)
      for (int kw = 0; kw < K; ++kw) {
        const __m256i mask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.lanes + (chunk * K + kw) * kLanes));
        for (int r = 0; r < R; ++r)
          acc[r] = _mm256_fmadd_ps(taps[kh * K + kw], _mm256_maskload_ps(src[kh][r] + j + kw * p.dil_w, mask), acc[r]);
      }
  }
  // lanes past the row land on later rows, which convolve_block writes afterwards
  for (int r = 0; r < R; ++r) store_inside_plane(p.y, p.out_h * p.out_w, (i + r) * p.out_w + j, acc[r]);
}

// Output rows [i, i + R), every chunk.
template <int K, int R>
void convolve_block(const PlaneConv& p, const __m256 (&taps)[K * K], __m256 bias, int64_t i) {
  const float* src[K][R];
  for (int kh = 0; kh < K; ++kh)
    for (int r = 0; r < R; ++r) {
      const int64_t row = i + r + kh * p.dil_h - p.pad_h;  // rows above and below the map read zeros
      src[kh][r] = (row >= 0 && row < p.h ? p.map + row * p.w : p.zeros) - p.pad_w;
    }
  const int64_t chunks = (p.out_w + kLanes - 1) / kLanes;
  const bool partial = p.out_w % kLanes != 0;
  // the partial chunk first: what its stores spill onto later rows, their own chunks
  // overwrite after it
  if (partial) convolve_chunk<K, R>(p, src, taps, bias, i, chunks - 1);
  for (int64_t chunk = 0; chunk < chunks - (partial ? 1 : 0); ++chunk) convolve_chunk<K, R>(p, src, taps, bias, i, chunk);
}

// The three views of input row `row` (zeros above and below the map) that kernel columns
// 0, 1, 2 read for output columns [j, j + 8).
LIGHTNING_GF_INLINE void load_views(const PlaneConv& p, int64_t row, int64_t j, bool inside, const __m256i (&mask)[3],
                                    __m256 (&views)[3]) {
  const float* src = (row >= 0 && row < p.h ? p.map + row * p.w : p.zeros) + j - p.pad_w;
  for (int kw = 0; kw < 3; ++kw) {
    const float* at = src + kw * p.dil_w;
    if (inside)
      views[kw] = _mm256_loadu_ps(at);
    else if (p.may_overread)
      views[kw] = _mm256_and_ps(_mm256_loadu_ps(at), _mm256_castsi256_ps(mask[kw]));
    else
      views[kw] = _mm256_maskload_ps(at, mask[kw]);
  }
}

// 3x3 kernels without dilation along the height: output rows [first, last) of one strip
// of 8 columns, top to bottom, each input row loaded once and kept for the three output
// rows that read it (the same sums in the same order as convolve_chunk).
void convolve_strip3(const PlaneConv& p, const __m256 (&taps)[9], __m256 bias, int64_t chunk, int64_t first,
                     int64_t last) {
  const int64_t j = chunk * kLanes;
  const bool inside = p.inside[chunk];
  __m256i mask[3];
  for (int kw = 0; kw < 3; ++kw)
    mask[kw] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.lanes + (chunk * 3 + kw) * kLanes));
  __m256 top[3], middle[3], bottom[3];
  load_views(p, first - p.pad_h, j, inside, mask, top);
  load_views(p, first + 1 - p.pad_h, j, inside, mask, middle);
  for (int64_t i = first; i < last; ++i) {
    load_views(p, i + 2 - p.pad_h, j, inside, mask, bottom);
    __m256 acc = bias;
    for (int kw = 0; kw < 3; ++kw) acc = _mm256_fmadd_ps(taps[kw], top[kw], acc);
    for (int kw = 0; kw < 3; ++kw) acc = _mm256_fmadd_ps(taps[3 + kw], middle[kw], acc);
    for (int kw = 0; kw < 3; ++kw) acc = _mm256_fmadd_ps(taps[6 + kw], bottom[kw], acc);
    store_inside_plane(p.y, p.out_h * p.out_w, i * p.out_w + j, acc);  // see convolve_chunk
    for (int kw = 0; kw < 3; ++kw) top[kw] = middle[kw], middle[kw] = bottom[kw];
  }
}

template <int K>
void convolve_plane(const PlaneConv& p, const float* kernel, float bias) {
  __m256 taps[K * K];
  for (int t = 0; t < K * K; ++t) taps[t] = _mm256_set1_ps(kernel[t]);
  const __m256 b = _mm256_set1_ps(bias);
  if constexpr (K == 3) {
    if (p.dil_h == 1 && p.out_w <= kStripMaxWidth) {  // narrow maps, in bands of kBandRows rows
      const int64_t chunks = (p.out_w + kLanes - 1) / kLanes;
      const bool partial = p.out_w % kLanes != 0;
      for (int64_t first = 0; first < p.out_h; first += kBandRows) {
        const int64_t last = std::min(p.out_h, first + kBandRows);
        if (partial) convolve_strip3(p, taps, b, chunks - 1, first, last);  // first: see convolve_block
        for (int64_t chunk = 0; chunk < chunks - (partial ? 1 : 0); ++chunk)
          convolve_strip3(p, taps, b, chunk, first, last);
      }
      return;
    }
  }
  int64_t i = 0;
  for (; i + kRows <= p.out_h; i += kRows) convolve_block<K, kRows>(p, taps, b, i);
  switch (p.out_h - i) {  // the last rows, side by side too
    case 3: convolve_block<K, 3>(p, taps, b, i); break;
    case 2: convolve_block<K, 2>(p, taps, b, i); break;
    case 1: convolve_block<K, 1>(p, taps, b, i); break;
    default: break;
  }
}
#endif

}  // namespace

bool DepthwiseConv::takes(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef conv, int64_t groups) {
#if LIGHTNING_GF_OWN_DEPTHWISE
  if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat || x.dim() != 4 || weight.dim() != 4 ||
      !x.is_contiguous() || !x.device().is_cpu() || !weight.device().is_cpu() || conv.size() != 6)
    return false;
  if (bias.has_value() && (bias->scalar_type() != at::kFloat || !bias->device().is_cpu() || bias->dim() != 1 ||
                           bias->size(0) != weight.size(0)))
    return false;
  const int64_t c = x.size(1), k = weight.size(2);
  // one channel is a dense conv to PyTorch (another kernel, another order)
  if (c < 2 || groups != c || weight.size(0) != c || weight.size(1) != 1 || weight.size(3) != k) return false;
  if (k != 3 && k != 5 && k != 7) return false;
  if (conv[0] != 1 || conv[1] != 1 || conv[4] < 1 || conv[5] < 1) return false;
  // where oneDNN runs the depthwise kernel whose order this one follows, as found by
  // comparing the two over random shapes: the kernel's extent inside the map, padding
  // below the extent and at most kMaxPadding (past those it adds in another order)
  const int64_t extent_h = conv[4] * (k - 1) + 1, extent_w = conv[5] * (k - 1) + 1;
  return x.size(0) > 0 && extent_h <= x.size(2) && extent_w <= x.size(3) && conv[2] >= 0 && conv[3] >= 0 &&
         conv[2] < extent_h && conv[3] < extent_w && conv[2] <= kMaxPadding && conv[3] <= kMaxPadding;
#else
  (void)x, (void)weight, (void)bias, (void)conv, (void)groups;
  return false;
#endif
}

DepthwiseConv::DepthwiseConv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef conv)
    : x_(x), weight_(weight.contiguous()), bias_(bias.has_value() ? bias->contiguous() : at::Tensor()) {
  channels_ = x.size(1), h_ = x.size(2), w_ = x.size(3), k_ = weight.size(2);
  planes_ = x.size(0) * channels_;
  pad_h_ = conv[2], pad_w_ = conv[3], dil_h_ = conv[4], dil_w_ = conv[5];
  out_h_ = h_ + 2 * pad_h_ - dil_h_ * (k_ - 1);
  out_w_ = w_ + 2 * pad_w_ - dil_w_ * (k_ - 1);
  y_ = at::empty({x.size(0), channels_, out_h_, out_w_}, x.options());
  x_data_ = x_.const_data_ptr<float>();
  weight_data_ = weight_.const_data_ptr<float>();
  bias_data_ = bias_.defined() ? bias_.const_data_ptr<float>() : nullptr;
  y_data_ = y_.mutable_data_ptr<float>();
  const int64_t chunks = (out_w_ + kLanes - 1) / kLanes;
  lanes_.assign(chunks * k_ * kLanes, 0);
  inside_.assign(chunks, 1);
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t kw = 0; kw < k_; ++kw)
      for (int64_t t = 0; t < kLanes; ++t) {
        const int64_t column = chunk * kLanes + t + kw * dil_w_ - pad_w_;
        const bool in_row = column >= 0 && column < w_;
        lanes_[(chunk * k_ + kw) * kLanes + t] = in_row ? -1 : 0;
        if (!in_row) inside_[chunk] = 0;
      }
  // read from column -pad_w up to the last chunk's last tap; zeros_[pad_w_] is column 0
  reach_ = chunks * kLanes + dil_w_ * (k_ - 1);
  zeros_.assign(reach_ + kLanes, 0.0f);
}

void DepthwiseConv::run_plane(int64_t plane) const {
#if LIGHTNING_GF_OWN_DEPTHWISE
  const float* map = x_data_ + plane * h_ * w_;
  // plain loads of a row read from column -pad_w to reach_ - pad_w: inside the tensor
  // except in the planes at its two ends
  const float* tensor_end = x_data_ + planes_ * h_ * w_;
  const bool may_overread = map - pad_w_ >= x_data_ && map + (h_ - 1) * w_ + reach_ - pad_w_ <= tensor_end;
  const PlaneConv p{map, zeros_.data() + pad_w_, y_data_ + plane * out_h_ * out_w_, h_, w_, out_h_, out_w_, pad_h_,
                    pad_w_, dil_h_, dil_w_, lanes_.data(), inside_.data(), may_overread};
  const int64_t channel = plane % channels_;
  const float* kernel = weight_data_ + channel * k_ * k_;
  const float bias = bias_data_ != nullptr ? bias_data_[channel] : 0.0f;
  switch (k_) {
    case 3: convolve_plane<3>(p, kernel, bias); break;
    case 5: convolve_plane<5>(p, kernel, bias); break;
    default: convolve_plane<7>(p, kernel, bias); break;
  }
#else
  (void)plane;
  TORCH_CHECK(false, "lightning_gf: the own depthwise conv needs AVX2 and FMA");
#endif
}

void DepthwiseConv::run_all() const {
  // split as pooling splits them, so the conv alone and the conv with pooling run alike
  at::parallel_for(0, planes_, pool_plane_grain(h_ * w_), [&](int64_t first, int64_t last) {
    for (int64_t plane = first; plane < last; ++plane) run_plane(plane);
  });
}

}  // namespace lightning_gf
