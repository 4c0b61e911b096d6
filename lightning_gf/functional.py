"""``from lightning_gf.functional import filtered_conv2d``: the filtered conv op
(:mod:`lightning_gf.ops.conv`)."""

from lightning_gf.ops.conv import filtered_conv2d, pool_patches, pooled_dtype

__all__ = ["filtered_conv2d", "pool_patches", "pooled_dtype"]
