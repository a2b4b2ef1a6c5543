"""Numeric primitives: Cauchy and Vandermonde products, FFT convolution, truncated power series."""
