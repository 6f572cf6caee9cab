#!/usr/bin/env bash
# What the build needs beyond Rust: nasm, which assembles libjpeg-turbo's SIMD JPEG decoding
# (mozjpeg-sys, the `nasm_simd` feature). Without it the build still succeeds, decoding without
# SIMD (about a third slower) and silently: cargo hides a registry crate's build warnings.
# `alexnet bench --data` warns of such a build, and tests/eval.rs fails one made while nasm was
# missing if nasm is installed later (cargo does not rebuild mozjpeg-sys by itself).
# Installs it from Debian's (or Ubuntu's) packages when it is missing and this user may;
# otherwise says how, and leaves the build to go on without SIMD.
set -uo pipefail
command -v nasm >/dev/null && exit 0
if command -v apt-get >/dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if { $sudo apt-get install -y -qq nasm || { $sudo apt-get update -qq && $sudo apt-get install -y -qq nasm; }; } >/dev/null 2>&1; then
    echo "setup: installed $(nasm -v)" >&2
    exit 0
  fi
fi
echo "warning: nasm is missing and could not be installed here (Debian/Ubuntu: apt-get install nasm);" \
  "JPEG decoding builds without SIMD" >&2
exit 0
