# Installs what the project needs on a fresh Debian 12 machine when it is missing; sourced by
# scripts/test.sh and scripts/demo.sh. Installs: a C and C++ toolchain, pkg-config, curl, python3,
# GStreamer 1.22 headers, tools and plugin sets (apt); Rust 1.95 (rustup) when cargo is missing.

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
# C++: tests/cuda_emulated.rs compiles the CUDA kernels for the host.
command -v c++ >/dev/null 2>&1 || need_apt+=(g++)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
command -v curl >/dev/null 2>&1 || need_apt+=(curl ca-certificates)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -c "import ensurepip" >/dev/null 2>&1 || need_apt+=(python3-venv)
# GStreamer (the plugin crate, its pipeline tests and the demo): headers, tools, and the plugin
# sets the pipelines use (videotestsrc, decodebin, x264enc, mp4mux, ...).
for pkg in libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-tools \
           gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad \
           gstreamer1.0-plugins-ugly gstreamer1.0-libav; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "== installing the Rust toolchain (rustup, 1.95)"
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95
  . "$HOME/.cargo/env"
fi
