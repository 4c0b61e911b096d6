// The filtered conv as one C++ autograd node, for CPU convs that filtered_backward takes
// (dense or depthwise, taps that collapse, NCHW maps): the forward pools the input and
// runs the conv (PyTorch's, or DepthwiseConv on each plane as pooling reads it), the
// backward is filtered_backward, with no Python on either side. On small maps the Python
// of an autograd.Function (its own call, saving, the steps around it) took about a fifth
// of the filtered layer's time, forward and backward: between two convs, Python's own
// code and data come back cold from memory.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "depthwise_conv.h"
#include "patch_kernels.h"

namespace lightning_gf {

// The autograd functions below are named outside an anonymous namespace, so that the
// node's name (y.grad_fn.name()) reads lightning_gf::FilteredConv2d.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Passes a gradient through unchanged; differentiating it raises `message` (the
// double backward a filtered conv does not have).
struct RefuseDoubleBackward : public torch::autograd::Function<RefuseDoubleBackward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const std::string& message) {
    ctx->saved_data["message"] = message;
    return grad.view_as(grad);
  }

  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, ctx->saved_data["message"].toStringRef());
    return {};
  }
};

// y = conv2d(x, weight, bias); backward: filtered_backward from the patch sums of x
// (absent when the weight needs no gradient): `pooled` when given (another filtered conv
// made them), else made here when `pool`. With `own_conv`, a conv that DepthwiseConv takes
// runs there, each plane right after pooling has read it. conv: stride, padding and
// dilation, two numbers each; grid: as filtered_backward takes it. Returns (y, the patch
// sums made here or an empty tensor). Absent tensors get no autograd edge: x, weight, then
// bias when given.
struct FilteredConv2d : public torch::autograd::Function<FilteredConv2d> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pooled,
                               at::IntArrayRef conv, int64_t groups, at::IntArrayRef grid, double scale, bool pool,
                               bool own_conv, const std::string& no_double_backward) {
    at::Tensor made, y;
    const bool make = pool && !pooled.has_value();
    if (own_conv && DepthwiseConv::takes(x, weight, bias, conv, groups)) {
      const DepthwiseConv depthwise(x, weight, bias, conv);
      if (make)
        made = std::get<0>(patch_pool_visiting(x, grid[3], grid[8], grid[4], grid[9], grid[2], grid[7], false, false,
                                               [&](int64_t plane) { depthwise.run_plane(plane); }));
      else
        depthwise.run_all();
      y = depthwise.output();
    } else {
      if (make) made = std::get<0>(patch_pool(x, grid[3], grid[8], grid[4], grid[9], grid[2], grid[7], false, false));
      y = at::conv2d(x, weight, bias, conv.slice(0, 2), conv.slice(2, 2), conv.slice(4, 2), groups);
    }
    ctx->save_for_backward({make ? made : pooled.value_or(at::Tensor()), weight});
    ctx->saved_data["bias"] = bias.has_value();
    ctx->saved_data["grid"] = grid.vec();
    ctx->saved_data["x"] = std::vector<int64_t>{x.size(2), x.size(3), static_cast<int64_t>(x.scalar_type())};
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["message"] = no_double_backward;
    if (!made.defined()) made = at::empty({0}, x.options());
    ctx->mark_non_differentiable({made});
    return {y, made};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool create_graph = at::GradMode::is_enabled();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2);
    variable_list result(11);  // one per argument of forward
    {
      at::AutoGradMode no_grad(false);  // computed once, never differentiated (see below)
      const variable_list saved = ctx->get_saved_variables();
      const std::vector<int64_t> x = ctx->saved_data["x"].toIntVector();
      const std::optional<at::Tensor> pooled = saved[0].defined() ? std::optional<at::Tensor>(saved[0]) : std::nullopt;
      auto [grad_x, grad_w, grad_b] = filtered_backward(
          grads[0].contiguous(), pooled, saved[1], ctx->saved_data["grid"].toIntVector(), x[0], x[1],
          ctx->saved_data["groups"].toInt(), ctx->saved_data["scale"].toDouble(),
          static_cast<at::ScalarType>(x[2]), need_x, need_w, need_b);
      if (need_x) result[0] = grad_x;
      if (need_w) result[1] = grad_w;
      if (need_b) result[2] = grad_b;
    }
    if (create_graph) {  // create_graph=True: the gradients work, a second backward through them raises
      const std::string message = ctx->saved_data["message"].toStringRef();
      for (int i = 0; i < 3; ++i)
        if (result[i].defined()) result[i] = RefuseDoubleBackward::apply(result[i].detach().requires_grad_(), message);
    }
    return result;
  }
};

namespace {

// (y, pooled): y from the autograd node above; pooled: the patch sums of x made here
// (when `pool`, the weight needs a gradient, and none were given), else an empty tensor.
std::tuple<at::Tensor, at::Tensor> filtered_conv2d(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& pooled, at::IntArrayRef conv,
                                                   int64_t groups, at::IntArrayRef grid, double scale, bool pool,
                                                   bool own_conv, c10::string_view no_double_backward) {
  TORCH_CHECK(conv.size() == 6, "lightning_gf: conv takes stride, padding and dilation, two numbers each");
  TORCH_CHECK(grid.size() == 10, "lightning_gf: grid takes 5 numbers per axis");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "lightning_gf: filtered_conv2d takes a contiguous NCHW input");
  const variable_list out = FilteredConv2d::apply(x, weight, bias, pooled, conv, groups, grid, scale, pool, own_conv,
                                                  std::string(no_double_backward));
  return {out[0], out[1]};
}

// PyTorch's own conv or DepthwiseConv, without autograd: what filtered_conv2d's forward
// computes with `own_conv`, for its check against PyTorch's conv (see functional.py).
at::Tensor depthwise_conv2d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef conv, int64_t groups) {
  TORCH_CHECK(conv.size() == 6, "lightning_gf: conv takes stride, padding and dilation, two numbers each");
  at::AutoGradMode no_grad(false);
  if (!DepthwiseConv::takes(x, weight, bias, conv, groups))
    return at::conv2d(x, weight, bias, conv.slice(0, 2), conv.slice(2, 2), conv.slice(4, 2), groups);
  const DepthwiseConv depthwise(x, weight, bias, conv);
  depthwise.run_all();
  return depthwise.output();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lightning_gf_cpu, m) {
  m.def("filtered_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? pooled, int[] conv, int groups, "
        "int[] grid, float scale, bool pool, bool own_conv, str no_double_backward) -> (Tensor, Tensor)");
  m.def("depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int[] conv, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(lightning_gf_cpu, CompositeImplicitAutograd, m) { m.impl("filtered_conv2d", &filtered_conv2d); }

TORCH_LIBRARY_IMPL(lightning_gf_cpu, CPU, m) { m.impl("depthwise_conv2d", &depthwise_conv2d); }

}  // namespace lightning_gf
