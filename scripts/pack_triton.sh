#!/usr/bin/env bash
# Pack a Triton for the GPU machine (Python 3.12; it ships 3.6 and reaches no registry) into one carry under
# 64 MiB with the working tree (~12 MiB): .device/triton-<VERSION>.tar.xz, unpacked there by
# scripts/gpu_triton.sh. Dropped: the AMD backend (and its entry point), CUPTI, the profiler and
# instrumentation, cuobjdump and nvdisasm, the symbols of libtriton.so, and the one of its two ptxas that
# sm_90 does not run (Triton >= 3.9 assembles sm_90 with ptxas-blackwell, the CUDA 13 one; older ones
# with ptxas).
#   bash scripts/pack_triton.sh [VERSION]    # default 3.9.0
set -euo pipefail
cd "$(dirname "$0")/.."
v=${1:-3.9.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q "triton==$v" --no-deps --python-version 3.12 --only-binary=:all: \
  --platform manylinux_2_28_x86_64 -d "$work"
mkdir "$work/site"
python3 -m zipfile -e "$work"/triton-"$v"-*.whl "$work/site"
t=$work/site/triton
rm -rf "$t/backends/amd" "$t/backends/nvidia/lib/cupti" "$t/backends/nvidia/lib/cupti-blackwell" "$t/profiler" \
       "$t/instrumentation" "$t/FileCheck" "$t/_C/libproton.so"
sed -i '/amd/d; /proton/d' "$work/site/triton-$v.dist-info/entry_points.txt"
strip --strip-unneeded "$t/_C/libtriton.so"
bin=$t/backends/nvidia/bin
rm -f "$bin/cuobjdump" "$bin/nvdisasm"
if [ "$(printf '%s\n3.9.0\n' "$v" | sort -V | head -1)" = 3.9.0 ]; then rm -f "$bin/ptxas"; else rm -f "$bin/ptxas-blackwell"; fi
chmod +x "$t/backends/nvidia/bin/"*  # zipfile drops the modes
mkdir -p .device
XZ_OPT=-9 tar cJf ".device/triton-$v.tar.xz" -C "$work/site" .
ls -la ".device/triton-$v.tar.xz"
