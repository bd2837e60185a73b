#!/usr/bin/env bash
# Build the C++ host against the libtorch inside the installed torch wheel.
#   hosts/cpp/build.sh [BUILD_DIR]     (default: build/cpp-host at the repository root)
# Prints the path of the built executable on its last line. PYTHON picks the interpreter whose torch is used.
set -euo pipefail
source_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build_dir="${1:-$source_dir/../../build/cpp-host}"
prefix="$("${PYTHON:-python3}" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
# Torch_DIR rather than a prefix path: it overrides a cached one when another torch is installed later.
cmake -S "$source_dir" -B "$build_dir" -DTorch_DIR="$prefix/Torch" -DCMAKE_BUILD_TYPE=Release >&2
cmake --build "$build_dir" --parallel >&2
echo "$(cd "$build_dir" && pwd)/reformer-host"
