#!/usr/bin/env bash
# Pack TileLang and its native dependencies (tvm-ffi, torch-c-dlpack-ext, z3) for the GPU machine into one
# archive that travels beside .device/wheels-a and wheels-c in a single call (the wheels are 51 + 28 MiB, over
# a call's 64): the wheels unpacked, z3's headers and binary dropped, its duplicate library a symlink, xz'd.
# Needs .device/wheels-b (tilelang, apache-tvm-ffi, torch-c-dlpack-ext) and .device/wheels-d (z3-solver), which
# ../shared/device/fetch-wheels.sh (or pip download, see NEXT_GPU_RUN.md) fills. scripts/gpu.sh setup unpacks it.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
for w in .device/wheels-b/*.whl .device/wheels-d/*.whl; do python3 -m zipfile -e "$w" "$work"; done
rm -rf "$work"/z3_solver-*.data
[ -f "$work/z3/lib/libz3.so.4.15" ] && ln -sf libz3.so.4.15 "$work/z3/lib/libz3.so"
find "$work" -name __pycache__ -prune -exec rm -rf {} +
tar cf - -C "$work" . | xz -T2 -6 > .device/tlbundle.tar.xz
du -h .device/tlbundle.tar.xz
