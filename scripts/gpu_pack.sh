#!/usr/bin/env bash
# Builds what scripts/gpu_check.sh runs on a GPU machine that has no cargo, and packs it in
# gpu-bin/ (stripped, ~25 MB; carry it with the device call): arbor, the kernel tests and the
# model tests, all release builds, and the commit they were built from.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
newest() { ls -t target/release/deps/"$1"-* | grep -v '\.d$' | head -1; }
cargo test --release --no-run -p arbor-kernels --test cuda
cargo test --release --no-run -p arbor-runtime --test models
rm -rf gpu-bin && mkdir -p gpu-bin
cp target/release/arbor gpu-bin/
cp "$(newest cuda)" gpu-bin/cuda-tests
cp "$(newest models)" gpu-bin/models-tests
strip gpu-bin/arbor gpu-bin/cuda-tests gpu-bin/models-tests
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo '+uncommitted')" >gpu-bin/COMMIT
# Not tracked, but carried: the device tool copies untracked files git does not ignore, and
# `carry` names ignored ones; listing it in info/exclude keeps `git status` clean.
grep -qx 'gpu-bin/' .git/info/exclude 2>/dev/null || echo 'gpu-bin/' >>.git/info/exclude
du -sh gpu-bin
