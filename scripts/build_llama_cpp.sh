#!/usr/bin/env bash
# Build llama.cpp (the CPU peer, see docs/REFERENCES "CPU peer") from the
# llama-cpp-python==0.3.9 sdist, which vendors llama.cpp under vendor/llama.cpp.
#
# Idempotent: the sdist is downloaded once, unpacked once, and cmake only
# rebuilds what changed.
#
# Env:
#   ARBOR_REFS     cache dir for the sdist, unpacked tree and build (default /work/refs)
#   LLAMA_TARGETS  cmake targets (default: llama-bench llama-batched-bench llama-simple llama-tokenize)
#   JOBS           parallel build jobs (default 2)
#
# Output: binaries in $ARBOR_REFS/llama_cpp_python-0.3.9/vendor/llama.cpp/build/bin/
# and the path of that dir on the last line of stdout.
set -euo pipefail

VERSION=0.3.9
REFS="${ARBOR_REFS:-/work/refs}"
TARGETS="${LLAMA_TARGETS:-llama-bench llama-batched-bench llama-simple llama-tokenize}"
JOBS="${JOBS:-2}"
TARBALL="$REFS/llama_cpp_python-$VERSION.tar.gz"
SRC="$REFS/llama_cpp_python-$VERSION"
LLAMA="$SRC/vendor/llama.cpp"

mkdir -p "$REFS"

# 1. The sdist. Look in the cache dir, its sdist/ subdir (where a plain
#    `pip download -d $REFS/sdist` puts it), then download.
if [ ! -s "$TARBALL" ]; then
    if [ -s "$REFS/sdist/llama_cpp_python-$VERSION.tar.gz" ]; then
        cp "$REFS/sdist/llama_cpp_python-$VERSION.tar.gz" "$TARBALL"
    else
        echo "downloading llama-cpp-python==$VERSION sdist (pip prepares metadata; minutes)" >&2
        tmp="$(mktemp -d "$REFS/dl.XXXXXX")"
        # --no-binary only for this package, so pip may use wheels for the
        # build backend's own requirements (cmake, ninja) while preparing metadata.
        python3 -m pip download --no-deps --no-binary llama-cpp-python \
            "llama-cpp-python==$VERSION" -d "$tmp" >&2
        mv "$tmp/llama_cpp_python-$VERSION.tar.gz" "$TARBALL"
        rm -rf "$tmp"
    fi
fi

# 2. Unpack.
if [ ! -f "$LLAMA/CMakeLists.txt" ]; then
    echo "unpacking $TARBALL" >&2
    tar -xzf "$TARBALL" -C "$REFS"
fi

# 3. cmake (a pip wheel is fine if the system has none).
if ! command -v cmake >/dev/null 2>&1; then
    echo "cmake not found; installing the PyPI wheel" >&2
    python3 -m pip install cmake >&2
fi

cd "$LLAMA"
if [ ! -f build/CMakeCache.txt ]; then
    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DCMAKE_BUILD_TYPE=Release >&2
fi
# shellcheck disable=SC2086
cmake --build build -j"$JOBS" --target $TARGETS >&2

for t in $TARGETS; do
    [ -x "build/bin/$t" ] || { echo "missing build/bin/$t" >&2; exit 1; }
done
echo "$LLAMA/build/bin"
