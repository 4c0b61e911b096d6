"""The math of gradient filtering and its autograd: the patch grid, the filtered conv, the
lean BatchNorm and activations. Imports ``lightning_gf.backends`` for the kernels, nothing above."""
