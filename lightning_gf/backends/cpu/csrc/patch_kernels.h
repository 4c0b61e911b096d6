// The entry points of patch_kernels.cpp that the other kernel sources call directly.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <tuple>

namespace lightning_gf {

// Sum (or, with `mean`, average) every patch of a kh x kw grid of ph x pw patches over
// an (N, C, H, W) map; returns an (N, C, ph, pw) view of channel-major sums and, with
// `channel_totals`, the per-channel total of the map.
std::tuple<at::Tensor, at::Tensor> patch_pool(const at::Tensor& input, int64_t kh, int64_t kw, int64_t before_h,
                                              int64_t before_w, int64_t ph, int64_t pw, bool mean,
                                              bool channel_totals);

// patch_pool, calling `after_plane(plane)` (plane = image * C + channel) on each plane
// right after pooling it, on the thread that pooled it, while the plane is in its cache.
std::tuple<at::Tensor, at::Tensor> patch_pool_visiting(const at::Tensor& input, int64_t kh, int64_t kw,
                                                       int64_t before_h, int64_t before_w, int64_t ph, int64_t pw,
                                                       bool mean, bool channel_totals,
                                                       const std::function<void(int64_t)>& after_plane);

// Planes of `cells` cells per task of patch_pool's parallel loop.
int64_t pool_plane_grain(int64_t cells);

// The filter's whole backward for dense and depthwise convs whose taps collapse: (g_x,
// g_w, g_b), an empty tensor for each one not needed. See patch_kernels.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> filtered_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& pooled, const at::Tensor& weight,
    at::IntArrayRef grid, int64_t in_h, int64_t in_w, int64_t groups, double scale, at::ScalarType x_dtype,
    bool need_x, bool need_w, bool need_b);

}  // namespace lightning_gf
