// Multi-scale deformable attention, fused CPU kernels (forward and backward).
//
// Compiled on first use by codetr/ops/deform_attn_cpp.py (torch.utils.cpp_extension.load); the
// pure-PyTorch implementation in codetr/ops/deform_attn.py is the reference and the fallback.
//
// Shapes (all contiguous):
//   value      (B, S, H, D)    S = sum over levels of H_l * W_l, levels stacked row-major
//   shapes     [H_0, W_0, H_1, W_1, ...]
//   locations  (B, Q, H, L, P, 2) normalised (x, y); pixel centres at (i + 0.5) / size
//   weights    (B, Q, H, L, P)
//   output     (B, Q, H, D)
// Bilinear sampling as F.grid_sample(align_corners=False, padding_mode="zeros"): a neighbour
// outside the map contributes zero.
//
// Forward: for each (b, q) and head, the weighted bilinear samples of all levels and points are
// accumulated directly into the output row (no per-level intermediate).
// Backward: grad value is a scatter-add; each task owns whole (b, head) slices of it (and, when
// there are more threads than (b, head) pairs, a private copy for its share of the queries), so
// no atomics are needed. grad locations and grad weights come from four dot products per sample.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Level {
  int64_t height, width, start;
};

std::vector<Level> make_levels(c10::IntArrayRef shapes, int64_t tokens) {
  TORCH_CHECK(shapes.size() % 2 == 0, "spatial_shapes must hold (H, W) pairs");
  std::vector<Level> levels;
  int64_t start = 0;
  for (size_t i = 0; i < shapes.size(); i += 2) {
    levels.push_back({shapes[i], shapes[i + 1], start});
    start += shapes[i] * shapes[i + 1];
  }
  TORCH_CHECK(start == tokens, "spatial_shapes cover ", start, " tokens but value has ", tokens);
  return levels;
}

// The four neighbours of one sampling point: their token index (-1 outside the map) and weight.
template <typename scalar_t>
struct Corners {
  int64_t index[4];
  scalar_t weight[4];
  scalar_t fx, fy;
};

// The pixel coordinate (centres at integers) of a normalised one, as F.grid_sample computes it on
// CPUs: (g + 1) * size / 2 - 0.5 from the grid g = 2 * loc - 1, rounded once (its vectorised
// kernel fuses the multiply-add; float32 coordinates rounded twice move the samples by up to an
// ulp of the coordinate, which changes outputs by ~1e-5 at a width of 152).
template <typename scalar_t>
inline scalar_t pixel_coordinate(scalar_t loc, int64_t size) {
  const scalar_t g1 = 2 * loc - 1 + 1;
  return static_cast<scalar_t>(static_cast<double>(g1) * (static_cast<double>(size) / 2) - 0.5);
}

// Returns false when the point is so far outside the map that every neighbour is outside.
template <typename scalar_t>
inline bool corners(scalar_t lx, scalar_t ly, const Level& level, Corners<scalar_t>& c) {
  const scalar_t x = pixel_coordinate(lx, level.width), y = pixel_coordinate(ly, level.height);
  // negated comparisons also reject NaN; the bounds keep floor() within int64
  if (!(x >= -1 && y >= -1 && x <= level.width && y <= level.height)) return false;
  const scalar_t x0f = std::floor(x), y0f = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  c.fx = x - x0f;
  c.fy = y - y0f;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const scalar_t ws[4] = {(1 - c.fx) * (1 - c.fy), c.fx * (1 - c.fy), (1 - c.fx) * c.fy, c.fx * c.fy};
  for (int k = 0; k < 4; ++k) {
    const bool inside = xs[k] >= 0 && xs[k] < level.width && ys[k] >= 0 && ys[k] < level.height;
    c.index[k] = inside ? level.start + ys[k] * level.width + xs[k] : -1;
    c.weight[k] = inside ? ws[k] : scalar_t(0);
  }
  return true;
}

// A reduction the compiler may vectorise (reordering the sum; the macro-free pragma must sit
// outside AT_DISPATCH's lambda).
template <typename scalar_t>
inline scalar_t dot_product(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n) {
  scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename scalar_t>
inline void prefetch(const scalar_t* row, int64_t dim) {
  constexpr int64_t line = 64 / sizeof(scalar_t);
  for (int64_t d = 0; d < dim; d += line) __builtin_prefetch(row + d);
}

void check_inputs(const at::Tensor& value, const at::Tensor& locations, const at::Tensor& weights) {
  TORCH_CHECK(value.device().is_cpu() && locations.device().is_cpu() && weights.device().is_cpu(),
              "codetr::ms_deform_attn: CPU tensors only");
  TORCH_CHECK(value.dim() == 4 && locations.dim() == 6 && weights.dim() == 5 && locations.size(5) == 2,
              "codetr::ms_deform_attn: value (B, S, H, D), locations (B, Q, H, L, P, 2), weights (B, Q, H, L, P)");
  TORCH_CHECK(value.scalar_type() == locations.scalar_type() && value.scalar_type() == weights.scalar_type(),
              "codetr::ms_deform_attn: value, locations and weights must share a dtype");
  TORCH_CHECK(locations.sizes().slice(0, 5) == weights.sizes() && locations.size(0) == value.size(0) &&
                  locations.size(2) == value.size(2),
              "codetr::ms_deform_attn: inconsistent shapes");
}

at::Tensor forward(const at::Tensor& value_in, c10::IntArrayRef shapes, const at::Tensor& locations_in,
                   const at::Tensor& weights_in) {
  check_inputs(value_in, locations_in, weights_in);
  const at::Tensor value = value_in.contiguous(), locations = locations_in.contiguous(),
                   weights = weights_in.contiguous();
  const int64_t batch = value.size(0), tokens = value.size(1), heads = value.size(2), dim = value.size(3);
  const int64_t queries = locations.size(1), num_levels = locations.size(3), points = locations.size(4);
  const std::vector<Level> levels = make_levels(shapes, tokens);
  TORCH_CHECK(static_cast<int64_t>(levels.size()) == num_levels, "spatial_shapes has ", levels.size(),
              " levels, locations ", num_levels);
  at::Tensor output = at::empty({batch, queries, heads, dim}, value.options());  // rows zeroed as they are filled
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward", [&] {
    const scalar_t* v = value.const_data_ptr<scalar_t>();
    const scalar_t* loc = locations.const_data_ptr<scalar_t>();
    const scalar_t* att = weights.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    // one task = one (b, q) row: all heads, levels and points
    at::parallel_for(0, batch * queries, 16, [&](int64_t begin, int64_t end) {
      Corners<scalar_t> c;
      // the (row, weight) of every neighbour of one (b, q), gathered first and prefetched: the
      // rows sit anywhere in the value tensor, and the loads of all of them overlap
      std::vector<const scalar_t*> rows(heads * num_levels * points * 4);
      std::vector<scalar_t> row_weights(rows.size());
      std::vector<int64_t> head_end(heads);
      for (int64_t bq = begin; bq < end; ++bq) {
        const int64_t b = bq / queries;
        int64_t n = 0;
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t sample0 = (bq * heads + h) * num_levels * points;
          for (int64_t l = 0; l < num_levels; ++l) {
            for (int64_t p = 0; p < points; ++p) {
              const int64_t s = sample0 + l * points + p;
              if (!corners(loc[2 * s], loc[2 * s + 1], levels[l], c)) continue;
              for (int k = 0; k < 4; ++k) {
                if (c.index[k] < 0) continue;
                rows[n] = v + ((b * tokens + c.index[k]) * heads + h) * dim;
                row_weights[n] = att[s] * c.weight[k];
                prefetch(rows[n], dim);
                ++n;
              }
            }
          }
          head_end[h] = n;
        }
        int64_t i = 0;
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t* __restrict__ o = out + (bq * heads + h) * dim;
          std::fill(o, o + dim, scalar_t(0));
          for (; i < head_end[h]; ++i) {
            const scalar_t* __restrict__ row = rows[i];
            const scalar_t w = row_weights[i];
            for (int64_t d = 0; d < dim; ++d) o[d] += w * row[d];
          }
        }
      }
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output_in, const at::Tensor& value_in,
                                                        c10::IntArrayRef shapes, const at::Tensor& locations_in,
                                                        const at::Tensor& weights_in) {
  check_inputs(value_in, locations_in, weights_in);
  const at::Tensor grad_output = grad_output_in.contiguous(), value = value_in.contiguous(),
                   locations = locations_in.contiguous(), weights = weights_in.contiguous();
  const int64_t batch = value.size(0), tokens = value.size(1), heads = value.size(2), dim = value.size(3);
  const int64_t queries = locations.size(1), num_levels = locations.size(3), points = locations.size(4);
  const std::vector<Level> levels = make_levels(shapes, tokens);
  TORCH_CHECK(grad_output.numel() == batch * queries * heads * dim, "codetr::ms_deform_attn: grad_output size");
  // Tasks are (split, b, h); a split is a share of the queries with its own copy of grad value,
  // used only when there are fewer (b, h) pairs than threads.
  const int64_t pairs = batch * heads;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>((at::get_num_threads() + pairs - 1) / pairs,
                                                                queries / 64));
  at::Tensor grad_value_parts = at::zeros({splits, batch, tokens, heads, dim}, value.options());
  at::Tensor grad_locations = at::empty_like(locations);  // every element is written below
  at::Tensor grad_weights = at::empty_like(weights);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward", [&] {
    const scalar_t* v = value.const_data_ptr<scalar_t>();
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* loc = locations.const_data_ptr<scalar_t>();
    const scalar_t* att = weights.const_data_ptr<scalar_t>();
    scalar_t* gv_parts = grad_value_parts.mutable_data_ptr<scalar_t>();
    scalar_t* gloc = grad_locations.mutable_data_ptr<scalar_t>();
    scalar_t* gatt = grad_weights.mutable_data_ptr<scalar_t>();
    const int64_t per_split = (queries + splits - 1) / splits;
    at::parallel_for(0, splits * pairs, 1, [&](int64_t begin, int64_t end) {
      // the neighbours of one query's samples, computed and prefetched before they are used
      std::vector<Corners<scalar_t>> cs(num_levels * points);
      std::vector<char> near(num_levels * points);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t split = task / pairs, b = (task % pairs) / heads, h = task % heads;
        scalar_t* gv = gv_parts + split * batch * tokens * heads * dim;
        const int64_t q_end = std::min(queries, (split + 1) * per_split);
        for (int64_t q = split * per_split; q < q_end; ++q) {
          const int64_t bqh = (b * queries + q) * heads + h;
          const int64_t sample0 = bqh * num_levels * points;
          for (int64_t l = 0; l < num_levels; ++l) {
            for (int64_t p = 0; p < points; ++p) {
              const int64_t i = l * points + p, s = sample0 + i;
              near[i] = corners(loc[2 * s], loc[2 * s + 1], levels[l], cs[i]);
              if (!near[i]) {  // no neighbour inside the map: no gradient
                gatt[s] = gloc[2 * s] = gloc[2 * s + 1] = 0;
                continue;
              }
              for (int k = 0; k < 4; ++k) {
                if (cs[i].index[k] < 0) continue;
                const int64_t offset = ((b * tokens + cs[i].index[k]) * heads + h) * dim;
                prefetch(v + offset, dim);
                prefetch(gv + offset, dim);
              }
            }
          }
          const scalar_t* __restrict__ g = go + bqh * dim;
          for (int64_t l = 0; l < num_levels; ++l) {
            for (int64_t p = 0; p < points; ++p) {
              const int64_t i = l * points + p, s = sample0 + i;
              if (!near[i]) continue;
              const Corners<scalar_t>& c = cs[i];
              const scalar_t a = att[s];
              // dot[k] = <grad_output row, value of neighbour k> (0 outside the map)
              scalar_t dot[4] = {0, 0, 0, 0};
              for (int k = 0; k < 4; ++k) {
                if (c.index[k] < 0) continue;
                const int64_t offset = ((b * tokens + c.index[k]) * heads + h) * dim;
                const scalar_t* __restrict__ row = v + offset;
                scalar_t* __restrict__ grow = gv + offset;
                const scalar_t w = a * c.weight[k];
                dot[k] = dot_product(g, row, dim);
                for (int64_t d = 0; d < dim; ++d) grow[d] += w * g[d];
              }
              gatt[s] = c.weight[0] * dot[0] + c.weight[1] * dot[1] + c.weight[2] * dot[2] + c.weight[3] * dot[3];
              // d sample / d x (pixel units) and d sample / d y, times d pixel / d normalised = W, H
              const scalar_t dx = (1 - c.fy) * (dot[1] - dot[0]) + c.fy * (dot[3] - dot[2]);
              const scalar_t dy = (1 - c.fx) * (dot[2] - dot[0]) + c.fx * (dot[3] - dot[1]);
              gloc[2 * s] = a * dx * levels[l].width;
              gloc[2 * s + 1] = a * dy * levels[l].height;
            }
          }
        }
      }
    });
  });
  at::Tensor grad_value = splits == 1 ? grad_value_parts[0] : grad_value_parts.sum(0);
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY(codetr, m) {
  m.def("ms_deform_attn(Tensor value, int[] spatial_shapes, Tensor locations, Tensor weights) -> Tensor");
  m.def("ms_deform_attn_backward(Tensor grad_output, Tensor value, int[] spatial_shapes, Tensor locations, "
        "Tensor weights) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(codetr, CPU, m) {
  m.impl("ms_deform_attn", &forward);
  m.impl("ms_deform_attn_backward", &backward);
}
