"""The patch grid of gradient filtering along one spatial axis (``shared/method.md``).

The output map of a conv is cut into ``ceil(H_out / r)`` patches of ``r`` cells,
centred on the map; the input map is cut into the same number of patches of
``r * stride`` cells, also centred. Cells of a patch that fall outside a map are
padding (they count zero and receive nothing).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


@dataclass(frozen=True)
class AxisGrid:
    """Patch grid along one axis.

    Attributes:
        patches: number of patches ``P = ceil(out_size / r)``.
        r: patch size on the output map.
        in_patch: patch size on the input map, ``r * stride``.
        out_before: cells of padding before the output map (``pad_y``).
        out_after: cells of padding after the output map.
        in_before: cells of padding before the input map (``pad_x``; negative when
            the grid is smaller than the input and covers only its centre).
        in_after: cells of padding after the input map (may be negative too).

    Example:
        >>> AxisGrid.build(in_size=7, out_size=4, r=2, stride=2)
        AxisGrid(patches=2, r=2, in_patch=4, out_before=0, out_after=0, in_before=1, in_after=0)
    """

    patches: int
    r: int
    in_patch: int
    out_before: int
    out_after: int
    in_before: int
    in_after: int

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def build(in_size: int, out_size: int, r: int, stride: int) -> "AxisGrid":
        patches = _ceil_div(out_size, r)
        out_before = _ceil_div(patches * r - out_size, 2)
        in_patch = r * stride
        in_before = _ceil_div(patches * in_patch - in_size, 2)
        return AxisGrid(
            patches=patches,
            r=r,
            in_patch=in_patch,
            out_before=out_before,
            out_after=patches * r - out_size - out_before,
            in_before=in_before,
            in_after=patches * in_patch - in_size - in_before,
        )

    def out_counts(self) -> list[int]:
        """Number of output cells inside the map for each patch."""
        size = self.patches * self.r - self.out_before - self.out_after
        return [
            min((i + 1) * self.r - self.out_before, size) - max(i * self.r - self.out_before, 0)
            for i in range(self.patches)
        ]

    def cells(self, on_input: bool) -> tuple[int, int, int]:
        """Patch size, and padding before and after the map, on the input map or the output map.

        Example:
            >>> AxisGrid.build(in_size=7, out_size=4, r=2, stride=2).cells(on_input=True)
            (4, 1, 0)
        """
        if on_input:
            return self.in_patch, self.in_before, self.in_after
        return self.r, self.out_before, self.out_after

    def cell_patches(self, on_input: bool) -> list[int]:
        """The patch of each cell of the map (input or output), ``-1`` outside the grid.

        Example:
            >>> AxisGrid.build(in_size=7, out_size=7, r=2, stride=1).cell_patches(on_input=True)
            [0, 1, 1, 2, 2, 3, 3]
        """
        k, before, after = self.cells(on_input)
        size = self.patches * k - before - after
        return [(i + before) // k if 0 <= i + before < self.patches * k else -1 for i in range(size)]

