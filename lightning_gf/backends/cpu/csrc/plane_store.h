// Storing eight float32 lanes into a plane that is written row after row: a register
// that ends past its row is stored whole, and its lanes past the row land on later rows,
// which the caller stores afterwards. Used by the depthwise conv and by patch_spread.
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace lightning_gf {

// Stores `lanes` at plane[start, start + 8): all eight where they stay inside the plane's
// `cells` values, else only the lanes inside it (copied: a masked store is much slower
// than a plain one on some CPUs, and a plain one would write into the next plane, which
// another thread may own).
#if defined(__GNUC__)
__attribute__((always_inline))  // in the kernels' inner loops (not inlined, the 8x256x14x14 spread took 1.4-1.6x as long)
#endif
inline void store_inside_plane(float* plane, int64_t cells, int64_t start, __m256 lanes) {
  if (start + 8 <= cells) {
    _mm256_storeu_ps(plane + start, lanes);
    return;
  }
  alignas(32) float values[8];
  _mm256_store_ps(values, lanes);
  std::copy(values, values + (cells - start), plane + start);
}

}  // namespace lightning_gf
#endif
