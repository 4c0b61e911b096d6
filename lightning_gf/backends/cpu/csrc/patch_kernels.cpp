// CPU kernels of the gradient filter's memory-bound steps: one pass over a map to sum
// (or average) it over a patch grid, one pass to spread patch values back over a map,
// and the two per-kernel steps on weights (sum the taps, broadcast one value over them).
// The two matrix products stay in ATen.
//
// A grid along one axis: patch p covers cells [p*k - before, (p+1)*k - before) of the
// map, clipped to [0, size); `before` may be negative (the grid is smaller than the map
// and the cells past it belong to no patch). Full-size maps are NCHW-contiguous; pooled
// maps are written channel-major, (C, N, ph, pw), and read with any image/channel strides.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "patch_kernels.h"
#include "plane_store.h"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lightning_gf {
namespace {

struct Span {
  int64_t begin;  // first cell of the patch inside the map
  int64_t end;    // one past its last cell (end <= begin: the patch misses the map)
};

std::vector<Span> spans(int64_t patches, int64_t k, int64_t before, int64_t size) {
  std::vector<Span> out(patches);
  for (int64_t p = 0; p < patches; ++p) {
    out[p].begin = std::clamp<int64_t>(p * k - before, 0, size);
    out[p].end = std::clamp<int64_t>((p + 1) * k - before, 0, size);
  }
  return out;
}

// Ask for transparent huge pages on the whole 2 MiB pages inside [lo, hi) of a fresh
// buffer, before its first write: a map of several MB otherwise costs one page fault per
// 4 KiB, which is most of the time spent writing it on some machines (VMs). A hint only.
void advise_huge_pages(const void* lo, const void* hi) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(lo) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(hi) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)lo;
  (void)hi;
#endif
}

void advise_huge_pages(const at::Tensor& t) {
  const char* data = static_cast<const char*>(t.data_ptr());
  advise_huge_pages(data, data + t.nbytes());
}

// A fresh tensor whose data starts on a 2 MiB boundary, with the huge-page hint: maps
// from 2 MiB up are then written through a few huge-page faults instead of hundreds of
// 4 KiB ones. The huge page that the data ends in is hinted too when the part of it past
// the data (resident while the tensor lives, never used) is at most `max_waste` bytes;
// otherwise that tail faults in 4 KiB pages. The slack before the data is never touched.
at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options, int64_t max_waste) {
  constexpr int64_t kHuge = int64_t(2) << 20;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t item = static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (numel * item < kHuge) return at::empty(sizes, options);
  const int64_t slack = kHuge / item;
  at::Tensor storage = at::empty({numel + slack}, options);
  const uintptr_t start = reinterpret_cast<uintptr_t>(storage.data_ptr());
  const uintptr_t aligned = (start + kHuge - 1) & ~uintptr_t(kHuge - 1);
  const int64_t offset = static_cast<int64_t>(aligned - start) / item;
  if ((aligned - start) % item != 0) return at::empty(sizes, options);
  at::Tensor out = storage.narrow(0, offset, numel).view(sizes);
  const int64_t tail = (numel * item) % kHuge;
  const bool whole_tail = tail == 0 || kHuge - tail <= max_waste;
  const char* data = static_cast<const char*>(out.data_ptr());
  advise_huge_pages(data, data + numel * item + (whole_tail && tail != 0 ? kHuge - tail : 0));
  return out;
}

void check_map(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "lightning_gf: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 4, "lightning_gf: ", name, " must be 4-D (N, C, H, W)");
}

// The patches [first, last) along an axis that lie whole inside the map (the others are
// clipped by its edges and take the general path).
struct WholeRange {
  int64_t first;
  int64_t last;
};

WholeRange whole_patches(int64_t patches, int64_t k, int64_t before, int64_t size) {
  int64_t first = before > 0 ? (before + k - 1) / k : 0;
  int64_t last = std::min<int64_t>(patches, (size + before) / k);
  first = std::min(first, patches);
  return {first, std::max(first, last)};
}

// line[j] = factor * values[q] for every column j of patch q; zero outside the grid.
template <int KW, typename acc_t, typename out_t>
void spread_columns(const acc_t* __restrict__ values, out_t* __restrict__ line, acc_t factor, int64_t k,
                    int64_t before, int64_t w, const std::vector<Span>& cols, WholeRange whole) {
  const int64_t kw = KW > 0 ? KW : k;
  const int64_t patches = static_cast<int64_t>(cols.size());
  if (whole.first > 0 || whole.last < patches || before != 0 || patches * kw != w)  // cells outside the grid
    std::fill(line, line + w, out_t(0));
  for (int64_t q = 0; q < patches; ++q) {
    if (q == whole.first) {  // whole patches: fixed width
      out_t* base = line - before;
      for (; q < whole.last; ++q) {
        const out_t v = static_cast<out_t>(values[q] * factor);
        for (int64_t t = 0; t < kw; ++t) base[q * kw + t] = v;
      }
      if (q >= patches) break;
    }
    const out_t v = static_cast<out_t>(values[q] * factor);
    for (int64_t j = cols[q].begin; j < cols[q].end; ++j) line[j] = v;
  }
}

// Maps of at most this many cells that the grid does not tile exactly are spread by the
// indexed path (per-row work with clipped patches would dominate there).
constexpr int64_t kSmallPlane = 1024;
// Scratch values per patch row that pool_narrow_plane needs: 4 registers and one spill.
constexpr int64_t kNarrowScratch = 40;
// How many small maps the indexed path fills side by side.
constexpr int64_t kPlaneBlock = 16;

// The patch of every cell of an h x w map, row-major; cells outside the grid get the
// index one past the last patch.
std::vector<int64_t> patch_index(const std::vector<Span>& rows, const std::vector<Span>& cols, int64_t h,
                                 int64_t w) {
  const int64_t ph = static_cast<int64_t>(rows.size()), pw = static_cast<int64_t>(cols.size());
  std::vector<int64_t> index(h * w, ph * pw);
  for (int64_t p = 0; p < ph; ++p)
    for (int64_t i = rows[p].begin; i < rows[p].end; ++i)
      for (int64_t q = 0; q < pw; ++q)
        for (int64_t j = cols[q].begin; j < cols[q].end; ++j) index[i * w + j] = p * pw + q;
  return index;
}

// Image and channel of consecutive planes (plane = image * c + channel), stepped without
// a division per plane: a 64-bit division takes tens of cycles, about what pooling a 7x7
// plane takes.
struct PlaneIndex {
  int64_t c, image, channel;
  PlaneIndex(int64_t plane, int64_t channels) : c(channels), image(plane / channels), channel(plane % channels) {}
  void next() {
    if (++channel == c) {
      channel = 0;
      ++image;
    }
  }
};

// Planes per task: about `task_cells` cells (64K by default), so that small maps stay on
// one thread (these passes are memory-bound; waking another thread costs more than it
// saves on them).
int64_t plane_grain(int64_t cells, int64_t task_cells = int64_t(1) << 16) {
  return std::max<int64_t>(1, task_cells / std::max<int64_t>(cells, 1));
}

// Pooling writes channel-major: the outputs of consecutive planes (consecutive channels of
// one image) lie n * ph * pw values apart, a stride the hardware's prefetchers do not
// follow, so where a plane's output is a line or a few, every plane waited on its first
// write. Where a plane's output spans at most kPrefetchLines lines, the output of the plane
// kPrefetchPlanes ahead is fetched for writing instead (measured between two convs: a
// 64x960x7x7 map pooled in 2.0 against 6.4 ms at r = 2, 8x256x14x14 at stride 2 in 0.12
// against 0.19 ms; maps whose planes pool into more lines gained nothing).
constexpr int64_t kPrefetchPlanes = 16;
constexpr int64_t kPrefetchLines = 4;

template <typename T>
bool worth_prefetching(int64_t count) {
  return count * static_cast<int64_t>(sizeof(T)) <= 64 * kPrefetchLines;
}

template <typename T>
void prefetch_for_writing(const T* data, int64_t count) {
#if defined(__GNUC__)
  const char* bytes = reinterpret_cast<const char*>(data);
  const int64_t lines = (count * static_cast<int64_t>(sizeof(T)) + 63) / 64;
  for (int64_t line = 0; line < lines; ++line) __builtin_prefetch(bytes + 64 * line, /*rw=*/1, /*locality=*/3);
#else
  (void)data;
  (void)count;
#endif
}

// Pooling takes 16K cells a task: an input pooled right after a conv has been pushed out
// of this core's cache by it, and two threads then read it faster (a 160x7x7 map, batch
// 8: 0.10 against 0.20 ms between two convs, on one thread below 64K cells).
constexpr int64_t kPoolTaskCells = int64_t(1) << 14;

template <typename Fn>
void with_width(int64_t k, Fn&& fn) {
  switch (k) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    default: fn(std::integral_constant<int, 0>{}); break;
  }
}

// Sums the rows [begin, end) of a map (row length w) into `acc`, column by column, row
// after row: sequential reads and elementwise loops the compiler vectorises (summing
// patch by patch is a chain of scalar adds, several times slower).
template <typename scalar_t, typename acc_t>
void sum_rows(const scalar_t* __restrict__ map, int64_t w, int64_t begin, int64_t end, acc_t* __restrict__ acc) {
  const scalar_t* top = map + begin * w;
  if (end - begin == 1) {
    for (int64_t j = 0; j < w; ++j) acc[j] = static_cast<acc_t>(top[j]);
    return;
  }
  for (int64_t j = 0; j < w; ++j) acc[j] = static_cast<acc_t>(top[j]) + static_cast<acc_t>(top[w + j]);
  for (int64_t i = 2; i < end - begin; ++i) {
    const scalar_t* row = top + i * w;
    for (int64_t j = 0; j < w; ++j) acc[j] += static_cast<acc_t>(row[j]);
  }
}

// sums[q] = cells[q*KW] + ... + cells[q*KW + KW-1] for q < groups. With AVX2, groups of 2
// and 4 floats are added eight at a time by pairwise horizontal adds (compilers leave this
// loop scalar); elsewhere, and for other widths, one group at a time.
template <int KW, typename acc_t>
void sum_groups(const acc_t* __restrict__ cells, int64_t groups, acc_t* __restrict__ sums) {
  int64_t q = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<acc_t, float> && KW == 2) {
    for (; q + 8 <= groups; q += 8) {  // hadd: [a01 a23 b01 b23 | a45 a67 b45 b67], then put the halves in order
      const __m256 pairs = _mm256_hadd_ps(_mm256_loadu_ps(cells + 2 * q), _mm256_loadu_ps(cells + 2 * q + 8));
      _mm256_storeu_ps(sums + q, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pairs), 0xD8)));
    }
  }
  if constexpr (std::is_same_v<acc_t, float> && KW == 4) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; q + 8 <= groups; q += 8) {
      const float* a = cells + 4 * q;
      const __m256 low = _mm256_hadd_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(a + 8));
      const __m256 high = _mm256_hadd_ps(_mm256_loadu_ps(a + 16), _mm256_loadu_ps(a + 24));
      _mm256_storeu_ps(sums + q, _mm256_permutevar8x32_ps(_mm256_hadd_ps(low, high), order));
    }
  }
#endif
  for (; q < groups; ++q) {
    acc_t s = 0;
    for (int t = 0; t < KW; ++t) s += cells[q * KW + t];
    sums[q] = s;
  }
}

// The sum of n values, in eight interleaved partial sums (one chain of scalar adds
// would take four cycles a value).
template <typename acc_t>
acc_t sum_values(const acc_t* __restrict__ values, int64_t n) {
  acc_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += values[k + l];
  for (; k < n; ++k) lanes[0] += values[k];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// The sum of a map's `patches` sums in `out` when `total` (zero otherwise), then each
// sum times `factor[patch]` when `factor` is given.
template <typename acc_t>
acc_t finish_patches(acc_t* __restrict__ out, int64_t patches, const acc_t* factor, bool total) {
  const acc_t sum = total ? sum_values(out, patches) : acc_t(0);
  if (factor != nullptr)
    for (int64_t k = 0; k < patches; ++k) out[k] *= factor[k];
  return sum;
}

// The patch sums of one map (h x w, row-major) into `out` (ph x pw), each times
// `factor[patch]` when `factor` is given; returns the sum of the patch sums when `total`
// (zero otherwise). First the column sums of every patch row (one sequential read of the
// map; cells outside the grid are never read), then the columns of each patch: in one
// call over the whole map when the grid tiles its width. KW > 0: whole patches are KW
// wide. `scratch` holds ph * w values.
template <int KW, typename scalar_t, typename acc_t>
acc_t pool_plane(const scalar_t* __restrict__ map, int64_t w, const std::vector<Span>& rows,
                 const std::vector<Span>& cols, WholeRange whole_cols, int64_t before_w, const acc_t* factor,
                 bool total, acc_t* __restrict__ out, acc_t* __restrict__ scratch) {
  const int64_t ph = static_cast<int64_t>(rows.size()), pw = static_cast<int64_t>(cols.size());
  for (int64_t p = 0; p < ph; ++p) {
    if (rows[p].end > rows[p].begin)
      sum_rows(map, w, rows[p].begin, rows[p].end, scratch + p * w);
    else
      std::fill(scratch + p * w, scratch + (p + 1) * w, acc_t(0));
  }
  if (KW > 0 && before_w == 0 && pw * KW == w) {  // every patch whole along the width
    sum_groups<(KW > 0 ? KW : 1)>(scratch, ph * pw, out);
  } else {
    for (int64_t p = 0; p < ph; ++p) {
      const acc_t* acc = scratch + p * w;
      acc_t* sums = out + p * pw;
      if constexpr (KW > 0)  // the patches whole inside the map
        sum_groups<KW>(acc + whole_cols.first * KW - before_w, whole_cols.last - whole_cols.first,
                       sums + whole_cols.first);
      for (int64_t q = 0; q < pw; ++q) {  // the patches clipped by the map's edges
        if (KW > 0 && q >= whole_cols.first && q < whole_cols.last) continue;
        acc_t s = 0;
        for (int64_t j = cols[q].begin; j < cols[q].end; ++j) s += acc[j];
        sums[q] = s;
      }
    }
  }
  return finish_patches(out, ph * pw, factor, total);
}

#if defined(__AVX2__)
// Maps whose patch rows fit in V registers of 8 float32 lanes (7x7, 14x14, 28x28 maps):
// each patch row is summed in registers, its lanes shifted so that patches start at
// multiples of KW, then stored side by side, and one sum_groups pass over the plane's
// ph * pw * KW values makes its patch sums. Lanes outside the map or the grid are masked
// to zero. On such maps pool_plane's per-row loops cost 2-3x more (measured).
template <int V, int KW>
float pool_narrow_plane(const float* __restrict__ map, int64_t w, int64_t before_w, const std::vector<Span>& rows,
                        int64_t pw, const __m256i* masks, const float* lo, const float* hi, const float* factor,
                        bool total, float* __restrict__ out, float* __restrict__ scratch) {
  const int64_t ph = static_cast<int64_t>(rows.size()), line = pw * KW;
  // lane t of register v holds cell 8v + t - before_w of a row; where every lane the
  // plane's rows read lies inside the tensor (all planes but those at its two ends), plain
  // loads, and the lanes outside the map or the grid zeroed once per patch row (a masked
  // load per row was the slowest step); at the ends, masked loads (they read no masked lane)
  const bool inside = map - before_w >= lo && map + (ph > 0 ? rows[ph - 1].end : 0) * w - before_w + 8 * V <= hi;
  for (int64_t p = 0; p < ph; ++p) {
    __m256 acc[V];
    for (int v = 0; v < V; ++v) acc[v] = _mm256_setzero_ps();
    if (inside) {
      for (int64_t i = rows[p].begin; i < rows[p].end; ++i)
        for (int v = 0; v < V; ++v) acc[v] = _mm256_add_ps(acc[v], _mm256_loadu_ps(map + i * w - before_w + 8 * v));
      for (int v = 0; v < V; ++v) acc[v] = _mm256_and_ps(acc[v], _mm256_castsi256_ps(masks[v]));
    } else {
      for (int64_t i = rows[p].begin; i < rows[p].end; ++i)
        for (int v = 0; v < V; ++v)
          acc[v] = _mm256_add_ps(acc[v], _mm256_maskload_ps(map + i * w - before_w + 8 * v, masks[v]));
    }
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(scratch + p * line + 8 * v, acc[v]);
  }
  sum_groups<KW>(scratch, ph * pw, out);
  return finish_patches(out, ph * pw, factor, total);
}

// Lane t of register v reads cell 8v + t - before_w: if it lies in the map and among the
// grid's pw * kw lanes.
struct NarrowMasks {
  __m256i lanes[4];
  NarrowMasks(int64_t w, int64_t before_w, int64_t pw, int64_t kw) {
    for (int v = 0; v < 4; ++v) {
      alignas(32) int32_t m[8];
      for (int t = 0; t < 8; ++t) {
        const int64_t lane = 8 * v + t, cell = lane - before_w;
        m[t] = lane < pw * kw && cell >= 0 && cell < w ? -1 : 0;
      }
      lanes[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
    }
  }
};

// The widest patch row pool_narrow takes: 4 registers.
constexpr int64_t kNarrowLanes = 32;

// pool_narrow_plane for a float32 plane of a tensor spanning [lo, hi); false (nothing
// done) where patches are not whole (KW = 0) or a patch row is wider than kNarrowLanes.
// Other dtypes: always false (the overload below).
template <int KW>
bool pool_narrow(const float* map, int64_t w, int64_t before_w, const std::vector<Span>& rows, int64_t pw,
                 const NarrowMasks& masks, const float* lo, const float* hi, const float* factor, bool want_total,
                 float* out, float* scratch, float& total) {
  if constexpr (KW == 0) {
    return false;
  } else {
    const int64_t lanes = pw * KW;
    if (lanes > kNarrowLanes) return false;
    const auto run = [&](auto registers) {
      constexpr int V = decltype(registers)::value;
      total = pool_narrow_plane<V, KW>(map, w, before_w, rows, pw, masks.lanes, lo, hi, factor, want_total, out,
                                       scratch);
    };
    if (lanes <= 8) run(std::integral_constant<int, 1>{});
    else if (lanes <= 16) run(std::integral_constant<int, 2>{});
    else if (lanes <= 24) run(std::integral_constant<int, 3>{});
    else run(std::integral_constant<int, 4>{});
    return true;
  }
}
#else
struct NarrowMasks {
  NarrowMasks(int64_t, int64_t, int64_t, int64_t) {}
};
#endif

template <int KW, typename scalar_t, typename acc_t>
bool pool_narrow(const scalar_t*, int64_t, int64_t, const std::vector<Span>&, int64_t, const NarrowMasks&,
                 const scalar_t*, const scalar_t*, const acc_t*, bool, acc_t*, acc_t*, acc_t&) {
  return false;
}

}  // namespace

// Sum of every patch of the grid; when `mean`, divided by the number of its cells inside
// the map (the mean of its valid cells). Also returns the per-channel total of the map,
// shape (C,), when `channel_totals` (the exact bias gradient). Calls `after_plane(plane)`,
// when given, on each plane right after pooling it.
std::tuple<at::Tensor, at::Tensor> patch_pool_visiting(const at::Tensor& input, int64_t kh, int64_t kw,
                                                       int64_t before_h, int64_t before_w, int64_t ph, int64_t pw,
                                                       bool mean, bool channel_totals,
                                                       const std::function<void(int64_t)>& after_plane) {
  check_map(input, "input");
  TORCH_CHECK(kh >= 1 && kw >= 1 && ph >= 1 && pw >= 1, "lightning_gf: bad patch grid");
  const at::Tensor t = input.contiguous();
  const int64_t n = t.size(0), c = t.size(1), h = t.size(2), w = t.size(3);
  const auto acc_dtype = at::toOpMathType(t.scalar_type());
  // stored channel-major, (C, N, ph, pw), returned as an (N, C, ph, pw) view: the two
  // products of the backward then read it as a (C, N*ph*pw) matrix without a copy
  at::Tensor stored = at::empty({c, n, ph, pw}, t.options().dtype(acc_dtype));
  advise_huge_pages(stored);
  at::Tensor out = stored.permute({1, 0, 2, 3});
  at::Tensor plane_totals = at::empty({channel_totals ? n * c : 0}, t.options().dtype(acc_dtype));
  const std::vector<Span> rows = spans(ph, kh, before_h, h), cols = spans(pw, kw, before_w, w);
  const WholeRange whole_cols = whole_patches(pw, kw, before_w, w);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "lightning_gf_patch_pool", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> inv_cells(mean ? ph * pw : 0);  // 1 / (cells of the patch inside the map)
    for (int64_t k = 0; k < static_cast<int64_t>(inv_cells.size()); ++k) {
      const int64_t cells = std::max<int64_t>(rows[k / pw].end - rows[k / pw].begin, 0) *
                            std::max<int64_t>(cols[k % pw].end - cols[k % pw].begin, 0);
      inv_cells[k] = cells > 0 ? acc_t(1) / static_cast<acc_t>(cells) : acc_t(0);
    }
    const acc_t* factor = mean ? inv_cells.data() : nullptr;
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    acc_t* dst = stored.mutable_data_ptr<acc_t>();
    acc_t* totals = channel_totals ? plane_totals.mutable_data_ptr<acc_t>() : nullptr;
    with_width(kw, [&](auto width) {
      constexpr int KW = decltype(width)::value;
      const NarrowMasks masks(w, before_w, pw, kw);
      const scalar_t* end = src + n * c * h * w;
      at::parallel_for(0, n * c, pool_plane_grain(h * w), [&](int64_t first, int64_t last) {
        std::vector<acc_t> scratch(ph * std::max<int64_t>(w, kNarrowScratch));
        const bool prefetch = worth_prefetching<acc_t>(ph * pw);
        PlaneIndex at(first, c), ahead(first + kPrefetchPlanes, c);
        for (int64_t plane = first; plane < last; ++plane, at.next(), ahead.next()) {
          if (prefetch && plane + kPrefetchPlanes < last)
            prefetch_for_writing(dst + (ahead.channel * n + ahead.image) * ph * pw, ph * pw);
          const scalar_t* map = src + plane * h * w;
          acc_t* out = dst + (at.channel * n + at.image) * ph * pw;  // channel-major: (C, N, ph, pw)
          acc_t total;
          if (!pool_narrow<KW>(map, w, before_w, rows, pw, masks, src, end, factor, channel_totals, out,
                               scratch.data(), total))
            total = pool_plane<KW>(map, w, rows, cols, whole_cols, before_w, factor, channel_totals, out,
                                   scratch.data());
          if (totals != nullptr) totals[plane] = total;
          if (after_plane) after_plane(plane);
        }
      });
    });
  });
  at::Tensor bias = at::zeros({channel_totals ? c : 0}, stored.options());
  if (channel_totals) {
    AT_DISPATCH_FLOATING_TYPES(bias.scalar_type(), "lightning_gf_channel_totals", [&] {
      const scalar_t* planes = plane_totals.const_data_ptr<scalar_t>();
      scalar_t* channels = bias.mutable_data_ptr<scalar_t>();
      for (int64_t plane = 0; plane < n * c; ++plane) channels[plane % c] += planes[plane];
    });
  }
  return {out, bias};
}

int64_t pool_plane_grain(int64_t cells) { return plane_grain(cells, kPoolTaskCells); }

std::tuple<at::Tensor, at::Tensor> patch_pool(const at::Tensor& input, int64_t kh, int64_t kw,
                                              int64_t before_h, int64_t before_w, int64_t ph,
                                              int64_t pw, bool mean, bool channel_totals) {
  return patch_pool_visiting(input, kh, kw, before_h, before_w, ph, pw, mean, channel_totals, {});
}

namespace {

#if defined(__AVX2__)
// patch_spread for float32 maps 8 to 16 cells wide whose grids have at most 8 patches a
// row (14x14 maps at r = 2 and 4): each patch row is made once in registers (its patch
// values permuted onto their columns, the columns outside the grid masked to zero) and
// stored whole on every row of the patch, plane after plane. Where a row's last register
// ends past the row, its lanes past the row land on the next rows, which are stored
// afterwards (store_inside_plane). Measured against the paths below, 8x256x14x14 at r = 4
// (the indexed path): 0.10 against 0.16-0.18 ms in a loop, 0.21 against 0.49 ms between
// the backward's other steps; at r = 2 (the row path) 0.13 against 0.18-0.20 ms. On 7x7
// maps (0.28 against 0.19 ms) and 28x28 maps (0.19 against 0.17 ms) the other paths stay
// faster.
constexpr int64_t kSpreadNarrowMin = 8;
constexpr int64_t kSpreadNarrowMax = 16;
// Returns false (nothing done) where it does not take the map.
bool spread_narrow(const float* src, int64_t stride_n, int64_t stride_c, float* dst, int64_t n, int64_t c, int64_t h,
                   int64_t w, const std::vector<Span>& rows, const std::vector<Span>& cols, float factor) {
  const int64_t ph = static_cast<int64_t>(rows.size()), pw = static_cast<int64_t>(cols.size());
  if (w < kSpreadNarrowMin || w > kSpreadNarrowMax || pw > 8) return false;
  const int64_t registers = (w + 7) / 8;
  alignas(32) int32_t index[16], keep[16], first[8];
  for (int64_t cell = 0; cell < 16; ++cell) {
    index[cell] = 0, keep[cell] = 0;
    for (int64_t q = 0; q < pw && cell < w; ++q)
      if (cell >= cols[q].begin && cell < cols[q].end) index[cell] = static_cast<int32_t>(q), keep[cell] = -1;
  }
  for (int64_t lane = 0; lane < 8; ++lane) first[lane] = lane < pw ? -1 : 0;
  __m256i lanes[2], masks[2];
  for (int64_t v = 0; v < registers; ++v) {
    lanes[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(index + 8 * v));
    masks[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(keep + 8 * v));
  }
  const __m256i patch_row = _mm256_load_si256(reinterpret_cast<const __m256i*>(first));
  const __m256 scale = _mm256_set1_ps(factor);
  const int64_t plane_cells = h * w;
  at::parallel_for(0, n * c, plane_grain(plane_cells), [&](int64_t begin, int64_t end) {
    PlaneIndex at(begin, c);
    for (int64_t plane = begin; plane < end; ++plane, at.next()) {
      const float* patches = src + at.image * stride_n + at.channel * stride_c;
      float* map = dst + plane * plane_cells;
      const auto store_row = [&](int64_t i, const __m256 (&row)[2]) {
        for (int64_t v = 0; v < registers; ++v) store_inside_plane(map, plane_cells, i * w + 8 * v, row[v]);
      };
      const __m256 zeros[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      int64_t covered = 0;  // rows stored so far, in order (see above)
      for (int64_t p = 0; p < ph; ++p) {
        if (rows[p].end <= rows[p].begin) continue;
        for (; covered < rows[p].begin; ++covered) store_row(covered, zeros);  // rows before the grid
        const __m256 values = _mm256_mul_ps(_mm256_maskload_ps(patches + p * pw, patch_row), scale);
        __m256 row[2];
        for (int64_t v = 0; v < registers; ++v)
          row[v] = _mm256_and_ps(_mm256_permutevar8x32_ps(values, lanes[v]), _mm256_castsi256_ps(masks[v]));
        for (; covered < rows[p].end; ++covered) store_row(covered, row);
      }
      for (; covered < h; ++covered) store_row(covered, zeros);  // rows after the grid
    }
  });
  return true;
}
#endif

// Other dtypes, or without AVX2: never taken.
template <typename acc_t, typename scalar_t>
bool spread_narrow(const acc_t*, int64_t, int64_t, scalar_t*, int64_t, int64_t, int64_t, int64_t,
                   const std::vector<Span>&, const std::vector<Span>&, acc_t) {
  return false;
}

// A map of `size` (N, C, H, W), dtype `dtype`: each cell gets `scale` times the value of
// the patch it falls in (zero outside the grid).
at::Tensor patch_spread(const at::Tensor& low_in, int64_t h, int64_t w, int64_t kh, int64_t kw,
                        int64_t before_h, int64_t before_w, double scale, at::ScalarType dtype) {
  check_map(low_in, "low");
  const int64_t n = low_in.size(0), c = low_in.size(1), ph = low_in.size(2), pw = low_in.size(3);
  // g_x lives only until autograd has passed it on: its last huge page whole, however empty
  at::Tensor out = empty_on_huge_pages({n, c, h, w}, low_in.options().dtype(dtype), /*max_waste=*/int64_t(2) << 20);
  const std::vector<Span> rows = spans(ph, kh, before_h, h), cols = spans(pw, kw, before_w, w);
  const WholeRange whole = whole_patches(pw, kw, before_w, w);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lightning_gf_patch_spread", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor values = low_in.to(c10::CppTypeToScalarType<acc_t>::value);
    if (values.stride(3) != 1 || values.stride(2) != pw) values = values.contiguous();  // rows of patches
    const acc_t factor = static_cast<acc_t>(scale);
    const acc_t* src = values.const_data_ptr<acc_t>();
    // the patch values of plane (image i, channel k) = i * c + k: any image/channel strides
    const int64_t stride_n = values.stride(0), stride_c = values.stride(1);
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const bool tiled = before_h == 0 && before_w == 0 && ph * kh == h && pw * kw == w;
    if (spread_narrow(src, stride_n, stride_c, dst, n, c, h, w, rows, cols, factor)) return;
    if (h * w <= kSmallPlane && !tiled) {  // small maps cut by the grid: one indexed pass per plane
      const std::vector<int64_t> patch_of = patch_index(rows, cols, h, w);
      const int64_t slots = ph * pw + 1;  // the last slot holds the zero of cells outside the grid
      at::parallel_for(0, n * c, plane_grain(h * w), [&](int64_t first, int64_t last) {
        std::vector<scalar_t> value(kPlaneBlock * slots, scalar_t(0));
        for (int64_t block = first; block < last; block += kPlaneBlock) {
          const int64_t planes = std::min(kPlaneBlock, last - block);
          PlaneIndex at(block, c);
          for (int64_t b = 0; b < planes; ++b, at.next()) {
            const acc_t* patches = src + at.image * stride_n + at.channel * stride_c;
            for (int64_t k = 0; k < ph * pw; ++k) value[b * slots + k] = static_cast<scalar_t>(patches[k] * factor);
          }
          scalar_t* maps = dst + block * h * w;
          for (int64_t e = 0; e < h * w; ++e) {
            const scalar_t* slot = value.data() + patch_of[e];
            for (int64_t b = 0; b < planes; ++b) maps[b * h * w + e] = slot[b * slots];
          }
        }
      });
      return;
    }
    with_width(kw, [&](auto width) {
      constexpr int KW = decltype(width)::value;
      at::parallel_for(0, n * c, plane_grain(h * w), [&](int64_t first, int64_t last) {
        PlaneIndex at(first, c);
        for (int64_t plane = first; plane < last; ++plane, at.next()) {
          const acc_t* patches = src + at.image * stride_n + at.channel * stride_c;
          scalar_t* map = dst + plane * h * w;
          int64_t covered = 0;  // rows written so far
          for (int64_t p = 0; p < ph; ++p) {
            if (rows[p].end <= rows[p].begin) continue;
            std::fill(map + covered * w, map + rows[p].begin * w, scalar_t(0));  // rows before the grid
            scalar_t* first_row = map + rows[p].begin * w;
            spread_columns<KW>(patches + p * pw, first_row, factor, kw, before_w, w, cols, whole);
            for (int64_t i = rows[p].begin + 1; i < rows[p].end; ++i)
              std::copy(first_row, first_row + w, map + i * w);
            covered = rows[p].end;
          }
          std::fill(map + covered * w, map + h * w, scalar_t(0));  // rows after the grid
        }
      });
    });
  });
  return out;
}

// One pass over the kernels of a weight (`pairs` kernels of `taps` taps, contiguous): when
// `sums` is given, each kernel's taps are summed into it; when `grad` is given, each of its
// kernels is filled with values[k] * factor (the filter's weight gradient). Both in one
// pass where both are asked for: reading the weight and writing its gradient side by side
// costs about half of two passes (1.3 against 1.7 ms for 512x512x3x3, 0.16 against 0.29
// for 256x256x3x3).
template <typename in_t, typename sum_t, typename acc_t, typename out_t>
void weight_pass(int64_t pairs, int64_t taps, const in_t* weight, sum_t* sums, const acc_t* values, acc_t factor,
                 out_t* grad) {
  const auto run = [&](auto fixed) {  // fixed > 0: the tap count known at compile time
    constexpr int kTaps = decltype(fixed)::value;
    const int64_t n_taps = kTaps > 0 ? kTaps : taps;
    at::parallel_for(0, pairs, plane_grain(n_taps), [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        if (sums != nullptr) {
          const in_t* __restrict__ w = weight + k * n_taps;
          acc_t s = 0;
          for (int64_t t = 0; t < n_taps; ++t) s += static_cast<acc_t>(w[t]);
          sums[k] = static_cast<sum_t>(s);
        }
        if (grad != nullptr) {
          const out_t v = static_cast<out_t>(values[k] * factor);
          out_t* __restrict__ d = grad + k * n_taps;
          for (int64_t t = 0; t < n_taps; ++t) d[t] = v;
        }
      }
    });
  };
  switch (taps) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 9: run(std::integral_constant<int, 9>{}); break;
    case 25: run(std::integral_constant<int, 25>{}); break;
    default: run(std::integral_constant<int, 0>{}); break;
  }
}

// A weight gradient of `sizes` and dtype `dtype`, on huge pages: it lives between steps, so
// its last huge page is taken whole only if that adds at most 1/8.
at::Tensor empty_weight_grad(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t bytes = static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  for (int64_t s : sizes) bytes *= s;
  return empty_on_huge_pages(sizes, options, /*max_waste=*/bytes / 8);
}

// (C_out, C_in/groups): the sum of each kernel's taps (the filter's low-resolution weight).
at::Tensor tap_sums(const at::Tensor& weight_in) {
  TORCH_CHECK(weight_in.device().is_cpu() && weight_in.dim() == 4, "lightning_gf: weight must be a 4-D CPU tensor");
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor out = at::empty({weight.size(0), weight.size(1)}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "lightning_gf_tap_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    weight_pass<scalar_t, scalar_t, acc_t, scalar_t>(out.numel(), weight.size(2) * weight.size(3),
                                                     weight.const_data_ptr<scalar_t>(),
                                                     out.mutable_data_ptr<scalar_t>(), nullptr, acc_t(0), nullptr);
  });
  return out;
}

// (C_out, C_in/groups, kh, kw) of dtype `dtype`, each kernel filled with its pair's value
// times `scale` (the filter's weight gradient: one value shared by every tap).
at::Tensor tap_broadcast(const at::Tensor& pairs_in, int64_t kh, int64_t kw, double scale, at::ScalarType dtype) {
  TORCH_CHECK(pairs_in.device().is_cpu() && pairs_in.dim() == 2, "lightning_gf: pairs must be a 2-D CPU tensor");
  at::Tensor out = empty_weight_grad({pairs_in.size(0), pairs_in.size(1), kh, kw}, pairs_in.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lightning_gf_tap_broadcast", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor values = pairs_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    weight_pass<scalar_t, scalar_t, acc_t, scalar_t>(values.numel(), kh * kw, nullptr, nullptr,
                                                     values.const_data_ptr<acc_t>(), static_cast<acc_t>(scale),
                                                     out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// Both of the above in one pass over weight-sized memory: the tap sums of `weight` in its
// accumulation dtype (float32 for half types), and its gradient, `pairs` times `scale`
// broadcast over the taps, in its own dtype.
std::tuple<at::Tensor, at::Tensor> tap_sums_and_broadcast(const at::Tensor& weight_in, const at::Tensor& pairs_in,
                                                          double scale) {
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor grad = empty_weight_grad(weight.sizes(), weight.options());
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "lightning_gf_tap_pass", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    sums = at::empty({weight.size(0), weight.size(1)}, weight.options().dtype(acc_type));
    const at::Tensor values = pairs_in.to(acc_type).contiguous();
    weight_pass<scalar_t, acc_t, acc_t, scalar_t>(sums.numel(), weight.size(2) * weight.size(3),
                                                  weight.const_data_ptr<scalar_t>(), sums.mutable_data_ptr<acc_t>(),
                                                  values.const_data_ptr<acc_t>(), static_cast<acc_t>(scale),
                                                  grad.mutable_data_ptr<scalar_t>());
  });
  return {sums, grad};
}

}  // namespace

// The filter's whole backward where its kernel taps collapse into their sum on both axes
// (dilation < r) and it is dense (groups = 1) or depthwise: the steps above and the two
// matrix products in one call, without a trip through Python between them. `grid` holds,
// per axis (h then w): r, the output padding before the grid, the patch count, the input
// patch size and the input padding before the grid. `pooled` is the patch sums of the
// input (channel-major, as patch_pool makes them). Returns (g_x, g_w, g_b), an empty
// tensor for each one not needed; `scale` multiplies g_x and g_w (strided convs).
std::tuple<at::Tensor, at::Tensor, at::Tensor> filtered_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& pooled, const at::Tensor& weight,
    at::IntArrayRef grid, int64_t in_h, int64_t in_w, int64_t groups, double scale, at::ScalarType x_dtype,
    bool need_x, bool need_w, bool need_b) {
  TORCH_CHECK(grid.size() == 10, "lightning_gf: grid takes 5 numbers per axis");
  const int64_t n = grad_out.size(0), c_out = grad_out.size(1), c_in_group = weight.size(1);
  const bool depthwise = groups == c_out && c_in_group == 1;
  TORCH_CHECK(groups == 1 || depthwise, "lightning_gf: filtered_backward takes dense or depthwise convs");
  const int64_t ph = grid[2], pw = grid[7];
  auto [gbar, total] = patch_pool(grad_out, grid[0], grid[5], grid[1], grid[6], ph, pw, /*mean=*/true, need_b);
  at::Tensor grad_x = grad_out.new_empty({0}, grad_out.options().dtype(x_dtype));
  at::Tensor grad_w;  // undefined until computed
  at::Tensor grad_b = weight.new_empty({0});
  // gbar is a (N, C_out, ph, pw) view of (C_out, N, ph, pw): read as a (C_out, N*ph*pw) matrix
  const at::Tensor g_matrix = gbar.transpose(0, 1).reshape({c_out, -1});
  at::Tensor per_pair;  // (C_out, C_in/groups): the weight gradient's one value per kernel
  if (need_w) {
    TORCH_CHECK(pooled.has_value(), "lightning_gf: the pooled input is needed for the weight gradient");
    const auto common = at::promote_types(gbar.scalar_type(), pooled->scalar_type());
    const at::Tensor xs = pooled->to(common);
    if (depthwise) {
      per_pair = (gbar.to(common) * xs).sum({0, 2, 3}).reshape({c_out, 1});
    } else {
      const at::Tensor x_matrix = xs.transpose(0, 1).reshape({xs.size(1), -1});
      per_pair = at::mm(g_matrix.to(common), x_matrix.t());
    }
  }
  const int64_t kh = weight.size(2), kw = weight.size(3);
  // the sums of the kernels' taps, in gbar's dtype, with the weight gradient in the same pass
  at::Tensor taps;
  if (need_x && kh * kw == 1) {
    taps = weight.to(gbar.scalar_type()).reshape({c_out, c_in_group});
  } else if (need_x && need_w && at::toOpMathType(weight.scalar_type()) == gbar.scalar_type()) {
    std::tie(taps, grad_w) = tap_sums_and_broadcast(weight, per_pair, scale);
  } else if (need_x) {
    taps = tap_sums(weight.to(gbar.scalar_type()));
  }
  if (need_w && !grad_w.defined()) grad_w = tap_broadcast(per_pair, kh, kw, scale, weight.scalar_type());
  if (need_x) {
    at::Tensor low;
    if (depthwise) {
      low = gbar * taps.reshape({1, c_out, 1, 1});
    } else {
      low = at::mm(taps.t(), g_matrix).view({c_in_group, n, ph, pw}).permute({1, 0, 2, 3});
    }
    grad_x = patch_spread(low, in_h, in_w, grid[3], grid[8], grid[4], grid[9], scale, x_dtype);
  }
  if (need_b) grad_b = total.to(weight.scalar_type());
  if (!grad_w.defined()) grad_w = weight.new_empty({0});
  return {grad_x, grad_w, grad_b};
}

TORCH_LIBRARY(lightning_gf_cpu, m) {
  m.def("tap_sums(Tensor weight) -> Tensor");
  m.def("tap_broadcast(Tensor pairs, int kh, int kw, float scale, ScalarType dtype) -> Tensor");
  m.def("patch_pool(Tensor input, int kh, int kw, int before_h, int before_w, int ph, int pw, bool mean, "
        "bool channel_totals) -> (Tensor, Tensor)");
  m.def("patch_spread(Tensor low, int h, int w, int kh, int kw, int before_h, int before_w, float scale, "
        "ScalarType dtype) -> Tensor");
  m.def("filtered_backward(Tensor grad_out, Tensor? pooled, Tensor weight, int[] grid, int in_h, int in_w, "
        "int groups, float scale, ScalarType x_dtype, bool need_x, bool need_w, bool need_b) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lightning_gf_cpu, CPU, m) {
  m.impl("patch_pool", &patch_pool);
  m.impl("patch_spread", &patch_spread);
  m.impl("tap_sums", &tap_sums);
  m.impl("tap_broadcast", &tap_broadcast);
  m.impl("filtered_backward", &filtered_backward);
}

}  // namespace lightning_gf
