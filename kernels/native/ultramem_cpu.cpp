// Native CPU kernels of the ultramem ops, registered with the dispatcher so that eager
// PyTorch, torch.compile and AOTInductor packages (from C++, with no Python) run them.
//
// The semantics are those of kernels/retrieve.py and kernels/aggregate.py, whose
// references stay the truth the tests hold these against: everything in fp32, ties toward
// the lower index at both top-k stages, NaN above every number (torch.sort's order).
// Schemas come from the op contract (kernels/contract.py), written into schemas.h at build.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "schemas.h"

namespace {

// torch.sort(descending=True, stable=True): NaN first, then larger, then the lower index.
inline bool ranks_before(float a, int64_t i, float b, int64_t j) {
  const bool a_nan = std::isnan(a), b_nan = std::isnan(b);
  if (a_nan || b_nan) return a_nan && (!b_nan || i < j);
  if (a != b) return a > b;
  return i < j;
}

// The `count` best of values[0..size) in rank order, into `order` (a partial selection,
// not a full sort: the grid is m*m, of which only k are kept).
void top_indices(const float* values, int64_t size, int64_t count, std::vector<int64_t>& order) {
  order.resize(size);
  std::iota(order.begin(), order.end(), int64_t{0});
  auto before = [values](int64_t i, int64_t j) { return ranks_before(values[i], i, values[j], j); };
  if (count < size) {
    std::nth_element(order.begin(), order.begin() + count, order.end(), before);
  }
  std::sort(order.begin(), order.begin() + count, before);
  order.resize(count);
}

void activate(float* scores, int64_t k, int64_t n_cores, const std::string& activation) {
  if (activation == "relu") {
    for (int64_t i = 0; i < k * n_cores; ++i) {
      if (scores[i] < 0.f) scores[i] = 0.f;  // NaN stays NaN, as torch.relu keeps it
    }
  } else if (activation == "softmax") {  // over the k selected, per core
    for (int64_t c = 0; c < n_cores; ++c) {
      float top = -std::numeric_limits<float>::infinity();
      bool nan = false;
      for (int64_t j = 0; j < k; ++j) {
        const float v = scores[j * n_cores + c];
        nan = nan || std::isnan(v);
        top = std::max(top, v);
      }
      float total = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        float& v = scores[j * n_cores + c];
        v = nan ? std::numeric_limits<float>::quiet_NaN() : std::exp(v - top);
        total += v;
      }
      for (int64_t j = 0; j < k; ++j) scores[j * n_cores + c] /= total;
    }
  }
}

void check_value(bool ok, const std::string& message) {
  TORCH_CHECK_VALUE(ok, "ultramem: ", message);
}

std::string shape_of(const at::Tensor& x) {
  std::string out = "(";
  for (int64_t d = 0; d < x.dim(); ++d) out += (d ? ", " : "") + std::to_string(x.size(d));
  return out + (x.dim() == 1 ? ",)" : ")");
}

std::tuple<at::Tensor, at::Tensor> retrieve_cpu(
    const at::Tensor& row_scores, const at::Tensor& col_scores, const at::Tensor& row_weight,
    const at::Tensor& col_weight, const at::Tensor& cores, int64_t topm, int64_t topk,
    c10::string_view activation_view) {
  const std::string activation(activation_view);
  check_value(row_scores.dim() == 4, "row_scores must be [T, H, n, r], got " + shape_of(row_scores));
  const int64_t tokens = row_scores.size(0), heads = row_scores.size(1);
  const int64_t n = row_scores.size(2), rank = row_scores.size(3);
  check_value(col_scores.sizes() == row_scores.sizes(),
              "col_scores must be [T, H, n, r] like row_scores, got " + shape_of(col_scores));
  check_value(row_weight.dim() == 2 && row_weight.size(0) == heads && row_weight.size(1) == rank,
              "row_weight must be [H, r], got " + shape_of(row_weight));
  check_value(col_weight.sizes() == row_weight.sizes(),
              "col_weight must be [H, r], got " + shape_of(col_weight));
  check_value(cores.dim() == 4 && cores.size(1) == heads && cores.size(2) == rank &&
                  cores.size(3) == rank,
              "cores must be [M, H, r, r], got " + shape_of(cores));
  check_value(1 <= topm && topm <= n, "topm = " + std::to_string(topm) + " must lie in [1, n]");
  check_value(1 <= topk && topk <= topm * topm,
              "topk = " + std::to_string(topk) + " must lie in [1, topm * topm]");
  check_value(activation == "none" || activation == "relu" || activation == "softmax",
              "activation must be one of none, relu, softmax, got " + activation);
  const int64_t n_cores = cores.size(0);
  const int64_t m = topm;

  const at::Tensor s_row = row_scores.to(at::kFloat).contiguous();
  const at::Tensor s_col = col_scores.to(at::kFloat).contiguous();
  const at::Tensor u = row_weight.to(at::kFloat).contiguous();
  const at::Tensor v = col_weight.to(at::kFloat).contiguous();
  const at::Tensor g = cores.to(at::kFloat).contiguous();
  at::Tensor scores = at::empty({tokens, heads, topk, n_cores}, s_row.options());
  at::Tensor slots = at::empty({tokens, heads, topk}, s_row.options().dtype(at::kLong));
  const float *row_p = s_row.data_ptr<float>(), *col_p = s_col.data_ptr<float>();
  const float *u_p = u.data_ptr<float>(), *v_p = v.data_ptr<float>(), *g_p = g.data_ptr<float>();
  float* scores_p = scores.data_ptr<float>();
  int64_t* slots_p = slots.data_ptr<int64_t>();

  // one (token, head) per task: its candidates, grid and top-k stay in this thread's cache
  const int64_t work = n * rank + m * m * rank * n_cores;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(work, 1));
  at::parallel_for(0, tokens * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> a_row(n), a_col(n), projected(m * rank), grids(n_cores * m * m),
        total(m * m);
    std::vector<int64_t> i_row, i_col, pos;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % heads;
      const float* sr = row_p + task * n * rank;
      const float* sc = col_p + task * n * rank;
      const float* uh = u_p + h * rank;
      const float* vh = v_p + h * rank;
      for (int64_t i = 0; i < n; ++i) {
        float ar = 0.f, ac = 0.f;
        for (int64_t p = 0; p < rank; ++p) {
          ar += sr[i * rank + p] * uh[p];
          ac += sc[i * rank + p] * vh[p];
        }
        a_row[i] = ar;
        a_col[i] = ac;
      }
      top_indices(a_row.data(), n, m, i_row);
      top_indices(a_col.data(), n, m, i_col);
      std::fill(total.begin(), total.end(), 0.f);
      for (int64_t c = 0; c < n_cores; ++c) {
        const float* core = g_p + (c * heads + h) * rank * rank;
        for (int64_t a = 0; a < m; ++a) {  // projected[a, q] = sum_p c_row[a, p] core[p, q]
          const float* x = sr + i_row[a] * rank;
          for (int64_t q = 0; q < rank; ++q) {
            float acc = 0.f;
            for (int64_t p = 0; p < rank; ++p) acc += x[p] * core[p * rank + q];
            projected[a * rank + q] = acc;
          }
        }
        float* grid = grids.data() + c * m * m;
        for (int64_t a = 0; a < m; ++a) {
          for (int64_t b = 0; b < m; ++b) {
            const float* y = sc + i_col[b] * rank;
            float acc = 0.f;
            for (int64_t q = 0; q < rank; ++q) acc += projected[a * rank + q] * y[q];
            grid[a * m + b] = acc;
            total[a * m + b] += acc;
          }
        }
      }
      top_indices(total.data(), m * m, topk, pos);
      float* out_scores = scores_p + task * topk * n_cores;
      int64_t* out_slots = slots_p + task * topk;
      for (int64_t j = 0; j < topk; ++j) {
        out_slots[j] = i_row[pos[j] / m] * n + i_col[pos[j] % m];
        for (int64_t c = 0; c < n_cores; ++c) {
          out_scores[j * n_cores + c] = grids[c * m * m + pos[j]];
        }
      }
      activate(out_scores, topk, n_cores, activation);
    }
  });
  return {scores.to(row_scores.scalar_type()), slots};
}

std::string range_error(const char* name, const at::Tensor& x, int64_t high) {
  const auto lo = at::min(x).item<int64_t>(), hi = at::max(x).item<int64_t>();
  if (lo >= 0 && hi < high) return "";
  return std::string(name) + " must lie in [0, " + std::to_string(high) + "), got [" +
         std::to_string(lo) + ", " + std::to_string(hi) + "]";
}

// Only the indices read are checked in the loop (a map may have a million entries); on a
// bad one, the reference's message, from a scan of the whole of each.
std::string index_error(const at::Tensor& ids, const at::Tensor& rmap, const at::Tensor& gmap,
                        int64_t width, int64_t rows, int64_t groups) {
  for (const auto& [name, x, high] :
       {std::tuple<const char*, const at::Tensor&, int64_t>{"slots", ids, width},
        {"row_map entries", rmap, rows},
        {"group_map entries", gmap, groups}}) {
    if (!x.defined() || x.numel() == 0) continue;
    std::string message = range_error(name, x, high);
    if (!message.empty()) return message;
  }
  return "an index is out of range";
}

// An index map read in its own dtype: a row map has one entry per virtual slot (a million
// at paper scale), so converting it to int64 on every call would cost more than the lookup.
class IndexMap {
 public:
  explicit IndexMap(const c10::optional<at::Tensor>& map)
      : tensor_(map.has_value() ? map->contiguous() : at::Tensor()) {
    if (!tensor_.defined()) return;
    heads_ = tensor_.size(0);
    width_ = tensor_.size(1);
    if (tensor_.scalar_type() == at::kInt) {
      p32_ = tensor_.data_ptr<int32_t>();
    } else {
      p64_ = tensor_.data_ptr<int64_t>();
    }
  }
  bool given() const { return tensor_.defined(); }
  const at::Tensor& tensor() const { return tensor_; }
  // map[h', slot], h' = head for an [H, S] map, 0 for a [1, S] map
  int64_t operator()(int64_t head, int64_t slot, int64_t otherwise) const {
    if (!tensor_.defined()) return otherwise;
    const int64_t at = (heads_ > 1 ? head : 0) * width_ + slot;
    return p32_ != nullptr ? static_cast<int64_t>(p32_[at]) : p64_[at];
  }

 private:
  at::Tensor tensor_;
  int64_t heads_ = 1, width_ = 0;
  const int32_t* p32_ = nullptr;
  const int64_t* p64_ = nullptr;
};

at::Tensor aggregate_cpu(const at::Tensor& values, const at::Tensor& weights,
                         const at::Tensor& slots, const c10::optional<at::Tensor>& row_map,
                         const c10::optional<at::Tensor>& group_map, int64_t groups,
                         c10::string_view pooling_view) {
  const std::string pooling(pooling_view);
  check_value(values.dim() == 2, "values must be [R, Dv], got " + shape_of(values));
  check_value(weights.dim() == 4, "weights must be [T, H, k, M], got " + shape_of(weights));
  const int64_t tokens = weights.size(0), heads = weights.size(1), k = weights.size(2);
  const int64_t n_cores = weights.size(3), rows = values.size(0), dim = values.size(1);
  check_value(slots.dim() == 3 && slots.size(0) == tokens && slots.size(1) == heads &&
                  slots.size(2) == k,
              "slots must be [T, H, k] like weights, got " + shape_of(slots));
  check_value(slots.scalar_type() == at::kLong || slots.scalar_type() == at::kInt,
              "slots must be int64, int32");
  check_value(n_cores >= 1 && dim % n_cores == 0,
              "values' Dv must split into M equal chunks, got Dv = " + std::to_string(dim));
  check_value(groups >= 1, "groups must be >= 1, got " + std::to_string(groups));
  check_value(pooling == "add" || pooling == "scatter",
              "pooling must be one of add, scatter, got " + pooling);
  int64_t width = rows;  // S: the maps' width, or the table's rows without maps
  for (const auto* map : {&row_map, &group_map}) {
    if (!map->has_value()) continue;
    const at::Tensor& x = **map;
    check_value(x.dim() == 2 && (x.size(0) == 1 || x.size(0) == heads),
                "index maps must be [1, S] or [H, S], got " + shape_of(x));
    check_value(x.scalar_type() == at::kLong || x.scalar_type() == at::kInt,
                "index maps must be int64, int32");
    width = x.size(1);
  }
  const int64_t chunk = dim / n_cores;
  // the table keeps its strides: a view of a weight (``values_t.t()``) would cost a copy of
  // the whole table on every call, far more than the rows a lookup reads
  const at::Tensor& table = values;
  const at::Tensor w = weights.to(at::kFloat).contiguous();
  const at::Tensor ids = slots.to(at::kLong).contiguous();
  const IndexMap rmap(row_map), gmap(group_map);
  at::Tensor pooled = at::zeros({tokens, groups, dim}, values.options().dtype(at::kFloat));
  const float* w_p = w.data_ptr<float>();
  const int64_t* ids_p = ids.data_ptr<int64_t>();
  float* out_p = pooled.data_ptr<float>();
  const int64_t row_stride = table.stride(0);
  const int64_t col_stride = table.stride(1);
  const bool scatter = pooling == "scatter";

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "aggregate", [&] {
    const scalar_t* table_p = table.data_ptr<scalar_t>();
    // indices are checked as they are read; the error is raised after the parallel region
    std::atomic<bool> bad{false};
    std::atomic<int64_t> bad_slot{0}, bad_row{0}, bad_group{0};
    at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        float* out = out_p + t * groups * dim;
        for (int64_t j = 0; j < heads * k; ++j) {  // head-major, the k of each head in order
          const int64_t h = j / k;
          const int64_t slot = ids_p[t * heads * k + j];
          if (slot < 0 || slot >= width) { bad_slot = slot; bad = true; continue; }
          const int64_t row = rmap(h, slot, slot);
          const int64_t group = gmap(h, slot, 0);
          if (row < 0 || row >= rows) { bad_row = row; bad = true; continue; }
          if (group < 0 || group >= groups) { bad_group = group; bad = true; continue; }
          const scalar_t* src = table_p + row * row_stride;
          float* dst = out + group * dim;
          const float* wj = w_p + (t * heads * k + j) * n_cores;
          for (int64_t c = 0; c < n_cores; ++c) {
            const float weight = wj[c];
            const scalar_t* s = src + c * chunk * col_stride;
            float* d = dst + c * chunk;
            if (col_stride != 1) {
              for (int64_t e = 0; e < chunk; ++e) {
                const float x = static_cast<float>(s[e * col_stride]) * weight;
                d[e] = scatter ? x : d[e] + x;
              }
            } else if (scatter) {
              for (int64_t e = 0; e < chunk; ++e) d[e] = static_cast<float>(s[e]) * weight;
            } else {
              for (int64_t e = 0; e < chunk; ++e) d[e] += static_cast<float>(s[e]) * weight;
            }
          }
        }
      }
    });
    if (bad.load()) {
      check_value(false, index_error(ids, rmap.tensor(), gmap.tensor(), width, rows, groups));
    }
  });
  return pooled.to(values.scalar_type());
}

}  // namespace

TORCH_LIBRARY(ultramem, m) {
  m.def(ULTRAMEM_RETRIEVE_SCHEMA);
  m.def(ULTRAMEM_AGGREGATE_SCHEMA);
}

TORCH_LIBRARY_IMPL(ultramem, CPU, m) {
  m.impl("retrieve", &retrieve_cpu);
  m.impl("aggregate", &aggregate_cpu);
}
