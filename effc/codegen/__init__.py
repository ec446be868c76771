"""Kernel plan -> source. One printer per backend; none knows a mechanism, only tile ops."""

# Bump when generated kernels change in a way that can change which tile configuration is fastest
# (loop structure, what is kept on chip, how loads are issued): tuned configurations recorded under an
# older version are then ignored, and `effc tune` records new ones.
CODEGEN_VERSION = 1
