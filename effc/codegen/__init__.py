"""Kernel plan -> source. One printer per backend; none knows a mechanism, only tile ops."""
