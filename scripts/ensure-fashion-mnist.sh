#!/bin/sh
# Make sure Fashion-MNIST is available for the quick grid: the system copy if present; on a
# Debian machine where we may install packages, the package dataset-fashion-mnist; otherwise
# the grid's `data.download: true` lets torchvision fetch it on first use.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -n "${ABLATE_DATA:-}" ] && ls "$ABLATE_DATA"/*idx3-ubyte* >/dev/null 2>&1; then
  echo "Fashion-MNIST: using \$ABLATE_DATA=$ABLATE_DATA"; exit 0
fi
if ls "$dir"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  echo "Fashion-MNIST: using $dir"; exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
  if [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; then
    echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"
    $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }
    if ls "$dir"/train-images-idx3-ubyte* >/dev/null 2>&1; then exit 0; fi
  fi
fi
echo "Fashion-MNIST: no local copy; torchvision will download it on first use (data.download: true)."
echo "  If this machine is offline: apt-get install dataset-fashion-mnist, or set ABLATE_DATA to a folder with the four idx files."
exit 0
