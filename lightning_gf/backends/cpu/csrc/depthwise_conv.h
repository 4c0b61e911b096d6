// lightning_gf's own depthwise conv, so that the filtered forward reads its input once:
// each plane is convolved right after pooling has read it, while it is in the cache.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace lightning_gf {

// A float32 depthwise conv (groups = C_in = C_out) of an NCHW-contiguous map with a
// square 3x3, 5x5 or 7x7 kernel, stride 1, any padding and dilation; built with AVX2 and
// FMA. Each output is the bias (or zero), then every tap's product added by one fused
// multiply-add, the kernel's rows top to bottom, each left to right: the order of
// oneDNN's depthwise kernel, which PyTorch's CPU conv runs, so both give the same bits
// (filtered_conv2d checks that on the first call of every conv before using this one).
class DepthwiseConv {
 public:
  // Whether this conv is one that DepthwiseConv runs (else the caller runs at::conv2d).
  // conv: stride, padding and dilation, two numbers each.
  static bool takes(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    at::IntArrayRef conv, int64_t groups);

  // Prepares the conv and allocates its output; nothing is computed yet.
  DepthwiseConv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                at::IntArrayRef conv);

  // Convolves plane `plane` (image * C + channel). Planes are independent: any thread,
  // any order.
  void run_plane(int64_t plane) const;

  // Convolves every plane, in parallel.
  void run_all() const;

  const at::Tensor& output() const { return y_; }

 private:
  at::Tensor x_, weight_, bias_, y_;
  const float* x_data_;
  const float* weight_data_;
  const float* bias_data_;  // nullptr: no bias
  float* y_data_;
  int64_t planes_, channels_, h_, w_, out_h_, out_w_, pad_h_, pad_w_, dil_h_, dil_w_, k_;
  int64_t reach_;  // a row's loads read columns [-pad_w, reach_ - pad_w)
  std::vector<int32_t> lanes_;  // per output chunk of 8 columns and kernel column: -1 where a lane reads the row
  std::vector<uint8_t> inside_;  // per output chunk: whether every lane of every kernel column reads the row
  std::vector<float> zeros_;     // the row that taps above and below the map read
};

}  // namespace lightning_gf
