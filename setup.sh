#!/usr/bin/env bash
# Sets up a fresh machine for this project: the Bible's SWORD modules and Apertium (Debian packages, as root),
# a virtual environment in .venv with PyTorch 2.13 and the project installed editable with its extras.
set -euo pipefail
cd "$(dirname "$0")"

# The Bible's SWORD modules; Apertium (rule-based es→en), the baseline the recipes report beside their models;
# Chromium, the headless browser the web page's test drives; a C compiler for the fused attention kernels
# (nmt/kernels.py; without one, training and decoding run their eager code).
packages="sword-text-sparv sword-text-web sword-text-kjv apertium apertium-eng-spa chromium gcc"
if [ ! -d /usr/share/sword/modules/texts/ztext/spaRV1909eb ] || [ ! -d /usr/share/sword/modules/texts/ztext/engWEB2015eb ] \
   || ! command -v apertium >/dev/null || ! command -v chromium >/dev/null || ! command -v cc >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null
  else
    echo "note: the Bible recipes need the SWORD modules: sudo apt-get install $packages" >&2
    echo "      (or download spaRV1909eb and engWEB2015eb from CrossWire and pass --modules DIR)" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
echo "setup done: .venv/bin/nmt --help"
