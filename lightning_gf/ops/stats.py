"""Running totals of what filtered layers keep for backward and the work they save."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class FilterStats:
    """Totals since the last :meth:`reset`, added to by every filtered forward.

    ``kept_bytes`` is the size of the tensors the filtered op saved for backward;
    ``vanilla_bytes`` the size of the input a plain conv would have saved (both read
    off the real tensors). The multiply-add counts are analytic.

    Example:
        >>> s = FilterStats()
        >>> s.add(FilterStats(kept_bytes=10, vanilla_bytes=40))
        >>> s.saved_bytes
        30
    """

    kept_bytes: int = 0
    vanilla_bytes: int = 0
    backward_macs_vanilla: int = 0
    backward_macs_filtered: int = 0

    @property
    def saved_bytes(self) -> int:
        return self.vanilla_bytes - self.kept_bytes

    def add(self, other: "FilterStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def add_counts(self, kept_bytes: int, vanilla_bytes: int, backward_macs_vanilla: int,
                   backward_macs_filtered: int) -> None:
        """:meth:`add` for one call's numbers, without building a ``FilterStats`` (every forward
        of every filtered layer adds to its stats).

        Example:
            >>> s = FilterStats()
            >>> s.add_counts(10, 40, 900, 100)
            >>> s.saved_bytes, s.backward_macs_filtered
            (30, 100)
        """
        self.kept_bytes += kept_bytes
        self.vanilla_bytes += vanilla_bytes
        self.backward_macs_vanilla += backward_macs_vanilla
        self.backward_macs_filtered += backward_macs_filtered

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)
