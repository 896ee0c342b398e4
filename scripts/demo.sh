#!/usr/bin/env bash
# `make demo` / `make demo-vault`: the Service Mesh Hub shared-trust guide, with every
# manual step automated. Usage: demo.sh [pkcs11|vault] (default pkcs11).
#   1. a root CA whose key is generated inside a SoftHSM token (pkcs11) or inside
#      OpenBao's PKI engine (vault: `bao server -dev` on 127.0.0.1, stopped at the end)
#   2. the signer (mTLS, VirtualMesh policy, audit log)
#   3. both meshes of config/virtual-mesh.yaml get intermediates via `meshca request`
#   4. both chains shown ending at the same root (the seed's `openssl s_client -showcerts` check)
#   5. a workload certificate from each cluster's intermediate and an mTLS handshake between them
# Everything lands in var/demo/ (vault: var/demo-vault/, so neither run clobbers the
# other's root and config), rebuilt from scratch each run. MESHCA_DEMO_DIR and
# MESHCA_DEMO_LISTEN (default 127.0.0.1:8443) put it elsewhere: tests/demo.rs runs the
# demo that way, beside anything else.
set -euo pipefail

backend=${1:-pkcs11}
case "$backend" in
  pkcs11|vault) ;;
  *) echo "usage: $0 [pkcs11|vault]" >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
meshca=${MESHCA:-$repo/target/release/meshca}
# var/demo or var/demo-vault: where this run leaves everything.
demo_rel=var/demo
[ "$backend" = vault ] && demo_rel=var/demo-vault
# The policy, as the signer config names it (relative to var/demo*, which the repo holds).
meshes_file=../../config/virtual-mesh.yaml
if [ -n "${MESHCA_DEMO_DIR:-}" ]; then
  demo_rel=$MESHCA_DEMO_DIR
  demo=$MESHCA_DEMO_DIR
  meshes_file=$repo/config/virtual-mesh.yaml
else
  demo=$repo/$demo_rel
fi
listen=${MESHCA_DEMO_LISTEN:-127.0.0.1:8443}
signer_url=https://$listen

bold=$(tput bold 2>/dev/null || true)
normal=$(tput sgr0 2>/dev/null || true)
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$normal"; }
run() { printf '$ %s\n' "$*"; "$@"; }

signer_pid=""
server_pid=""
bao_pid=""
stop_openbao() {
  if [ -n "$bao_pid" ] && kill -0 "$bao_pid" 2>/dev/null; then
    kill -TERM "$bao_pid" 2>/dev/null || true
    wait "$bao_pid" 2>/dev/null || true
  fi
  bao_pid=""
}
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  if [ -n "$signer_pid" ] && kill -0 "$signer_pid" 2>/dev/null; then
    kill -TERM "$signer_pid" 2>/dev/null || true
    wait "$signer_pid" 2>/dev/null || true
  fi
  stop_openbao
}
trap cleanup EXIT

[ -x "$meshca" ] || { echo "meshca binary not found at $meshca (run: make build)" >&2; exit 1; }
if (exec 3<>"/dev/tcp/${listen%:*}/${listen##*:}") 2>/dev/null; then
  echo "something already listens on $listen; stop it and run make demo again" >&2
  exit 1
fi

# A signer still running from this directory (started by hand, as the README shows, on
# another port) holds its audit log's lock: deleting the directory under it would leave it
# serving from deleted files.
if [ -e "$demo/audit.log" ] && ! flock -n "$demo/audit.log" true; then
  echo "a signer still uses $demo_rel (it holds $demo_rel/audit.log); stop it and run make demo again" >&2
  exit 1
fi

step "Fresh demo directory $demo_rel"
rm -rf "$demo"
mkdir -p "$demo/clusters"
cd "$demo"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

if [ "$backend" = pkcs11 ]; then
  step "1. A SoftHSM token (its PINs live in files, mode 0600, never on a command line)"
  "$repo/softhsm/setup-token-dir.sh" "$demo/softhsm"
  export SOFTHSM2_CONF=$demo/softhsm/softhsm2.conf
  module=$("$repo/scripts/softhsm-module.sh")
  backend_toml="backend = \"pkcs11\"

[pkcs11]
module = \"$module\"
key = \"pkcs11:token=meshca;object=root-ca\"
pin_file = \"softhsm/user-pin\"
softhsm2_conf = \"softhsm/softhsm2.conf\""
else
  bao_bin=$("$repo/scripts/bao-path.sh")
  # The root token goes to bao alone: exported, every meshca process of the demo would
  # carry it in its environment (/proc/<pid>/environ, a core dump) for its whole life.
  bao_token=
  bao() { BAO_TOKEN=$bao_token "$bao_bin" "$@"; }
  bao_port=$(free_port)
  step "1. OpenBao holds the root: bao server -dev on 127.0.0.1:$bao_port"
  echo "    (its root token comes from the environment and is kept in openbao/root-token, mode 0600;"
  echo "     meshca logs in with AppRole: openbao/role-id and openbao/secret-id, mode 0600;"
  echo "     root init and root show with another AppRole: openbao/ceremony-*, ceremony.toml)"
  (umask 077; mkdir -p openbao)
  # The dev server prints its root token: its log is private too.
  (umask 077
   od -An -tx1 -N16 /dev/urandom | tr -d ' \n' > openbao/root-token
   : > openbao/openbao.log)
  # Started directly (not through the bao function) so $! is the server itself.
  BAO_DEV_ROOT_TOKEN_ID=$(cat openbao/root-token) \
    "$bao_bin" server -dev -dev-listen-address="127.0.0.1:$bao_port" -dev-no-store-token \
    >> openbao/openbao.log 2>&1 &
  bao_pid=$!
  export BAO_ADDR=http://127.0.0.1:$bao_port
  bao_token=$(cat openbao/root-token)
  for _ in $(seq 1 300); do
    bao status >/dev/null 2>&1 && break
    kill -0 "$bao_pid" 2>/dev/null || { echo "OpenBao exited, see $demo_rel/openbao/openbao.log" >&2; exit 1; }
    sleep 0.1
  done
  bao status >/dev/null 2>&1 || {
    echo "OpenBao did not answer within 30 s; its log:" >&2
    tail -50 openbao/openbao.log >&2
    exit 1
  }
  run bao secrets enable pki
  run bao secrets tune -max-lease-ttl=87600h pki
  # What the serving signer may do: read and use the root issuer, nothing more (it cannot
  # make issuers or keys in the mount).
  printf '$ %s\n' "bao policy write meshca-signer - <<POLICY"
  bao policy write meshca-signer - <<'POLICY'
path "pki/issuer/meshca-root" { capabilities = ["read"] }
path "pki/issuer/meshca-root/sign-intermediate" { capabilities = ["update"] }
path "pki/issuer/meshca-root/sign-self-issued" { capabilities = ["update"] }
path "pki/config/urls" { capabilities = ["read"] }
POLICY
  # The ceremony (root init, root show): generate the root, read the issuer and its key.
  printf '$ %s\n' "bao policy write meshca-ceremony - <<POLICY"
  bao policy write meshca-ceremony - <<'POLICY'
path "pki/root/generate/internal" { capabilities = ["update"] }
path "pki/issuer/meshca-root" { capabilities = ["read"] }
path "pki/key/*" { capabilities = ["read"] }
path "pki/config/urls" { capabilities = ["read"] }
POLICY
  run bao auth enable approle
  run bao write auth/approle/role/meshca-signer token_policies=meshca-signer token_ttl=1h token_max_ttl=24h
  run bao write auth/approle/role/meshca-ceremony token_policies=meshca-ceremony token_ttl=10m token_max_ttl=10m
  (umask 077
   bao read -field=role_id auth/approle/role/meshca-signer/role-id > openbao/role-id
   bao write -f -field=secret_id auth/approle/role/meshca-signer/secret-id > openbao/secret-id
   bao read -field=role_id auth/approle/role/meshca-ceremony/role-id > openbao/ceremony-role-id
   bao write -f -field=secret_id auth/approle/role/meshca-ceremony/secret-id \
     > openbao/ceremony-secret-id)
  ls -l openbao | sed 's/^/    /'
  backend_toml="backend = \"vault\"

[vault]
address = \"$BAO_ADDR\"
mount = \"pki\"
issuer_ref = \"meshca-root\"

[vault.auth]
method = \"approle\"
role_id_file = \"openbao/role-id\"
secret_id_file = \"openbao/secret-id\""
fi

step "   The transport PKI for mTLS between the signer and the clusters (openssl)"
"$repo/scripts/transport-pki.sh" ca pki
"$repo/scripts/transport-pki.sh" server pki signer
"$repo/scripts/transport-pki.sh" client pki management-plane spiffe://meshca.demo/cluster/management-plane
"$repo/scripts/transport-pki.sh" client pki remote-cluster spiffe://meshca.demo/cluster/remote-cluster
ls -l pki | sed 's/^/    /'

cat > signer.toml <<EOF
# meshca signer configuration written by \`make $( [ "$backend" = vault ] && echo demo-vault || echo demo )\`. Relative paths are relative to
# this file. Run it again with: meshca serve --config $demo_rel/signer.toml
listen = "$listen"
virtual_meshes = ["$meshes_file"]
audit_log = "audit.log"

[tls]
cert = "pki/signer.pem"
key = "pki/signer.key"
client_ca = "pki/ca.pem"

[root]
certificate = "root-cert.pem"
virtual_mesh = "service-mesh-hub/virtual-mesh"
key_type = "rsa4096"
common_name = "meshca demo root CA"
$backend_toml

# Each cluster's agent may ask only for its own mesh.
[[clients]]
identity = "spiffe://meshca.demo/cluster/management-plane"
allow = [{ virtual_mesh = "service-mesh-hub/virtual-mesh", mesh = "service-mesh-hub/istio-istio-system-management-plane" }]

[[clients]]
identity = "spiffe://meshca.demo/cluster/remote-cluster"
allow = [{ virtual_mesh = "service-mesh-hub/virtual-mesh", mesh = "service-mesh-hub/istio-istio-system-new-remote-cluster" }]
EOF
if [ "$backend" = pkcs11 ]; then
  run "$meshca" token init --config signer.toml --so-pin-file softhsm/so-pin
  step "   The root CA: RSA-4096 generated inside the token, self-signed through C_Sign"
else
  step "   The root CA: RSA-4096 generated inside OpenBao (pki/root/generate/internal, never exported)"
fi
ceremony=signer.toml
if [ "$backend" = vault ]; then
  # The signer's config with the ceremony's AppRole: the serving one may not make a root.
  ceremony=ceremony.toml
  sed -e 's|"openbao/role-id"|"openbao/ceremony-role-id"|' \
      -e 's|"openbao/secret-id"|"openbao/ceremony-secret-id"|' signer.toml > "$ceremony"
fi
run "$meshca" root init --config "$ceremony"
run "$meshca" root show --config "$ceremony"

step "2. The signer: mTLS on $listen, policy from config/virtual-mesh.yaml"
# Every file the start reads, checked first (as the systemd unit does before a reload).
run "$meshca" serve --config signer.toml --check
"$meshca" serve --config signer.toml > signer.log 2>&1 &
signer_pid=$!
for _ in $(seq 1 100); do
  if curl -sf --cacert pki/ca.pem --cert pki/management-plane.pem --key pki/management-plane.key \
       "$signer_url/readyz" >/dev/null 2>&1; then
    break
  fi
  kill -0 "$signer_pid" 2>/dev/null || { echo "signer exited:" >&2; cat signer.log >&2; exit 1; }
  sleep 0.1
done
curl -sf --cacert pki/ca.pem --cert pki/management-plane.pem --key pki/management-plane.key \
  "$signer_url/readyz" >/dev/null 2>&1 || {
  echo "the signer is not ready after 10 s; its log:" >&2
  tail -50 signer.log >&2
  exit 1
}
run curl -s --cacert pki/ca.pem --cert pki/management-plane.pem --key pki/management-plane.key \
  "$signer_url/v1/virtualmeshes/service-mesh-hub/virtual-mesh"
echo

step "3. Each cluster generates its intermediate key locally and has it signed"
run "$meshca" request --signer "$signer_url" --ca-cert pki/ca.pem \
  --client-cert pki/management-plane.pem --client-key pki/management-plane.key \
  --virtual-mesh service-mesh-hub/virtual-mesh --mesh service-mesh-hub/istio-istio-system-management-plane \
  --out-dir clusters/management-plane/cacerts
run "$meshca" request --signer "$signer_url" --ca-cert pki/ca.pem \
  --client-cert pki/remote-cluster.pem --client-key pki/remote-cluster.key \
  --virtual-mesh service-mesh-hub/virtual-mesh --mesh service-mesh-hub/istio-istio-system-new-remote-cluster \
  --out-dir clusters/remote-cluster/cacerts

step "   Policy at work: the remote cluster may not ask for the management plane's mesh"
if "$meshca" request --signer "$signer_url" --ca-cert pki/ca.pem \
     --client-cert pki/remote-cluster.pem --client-key pki/remote-cluster.key \
     --virtual-mesh service-mesh-hub/virtual-mesh --mesh service-mesh-hub/istio-istio-system-management-plane \
     --out-dir clusters/denied 2>denied.txt; then
  echo "expected a denial" >&2; exit 1
fi
sed 's/^/    /' denied.txt
[ ! -e clusters/denied/ca-cert.pem ] || { echo "a denied request wrote files" >&2; exit 1; }

step "   Each cacerts directory checked the way istiod checks it"
for cluster in management-plane remote-cluster; do
  run "$meshca" verify "clusters/$cluster/cacerts" --root root-cert.pem
done
for cluster in management-plane remote-cluster; do
  openssl verify -CAfile "clusters/$cluster/cacerts/root-cert.pem" "clusters/$cluster/cacerts/ca-cert.pem"
done

step "4. Both chains end at the same root (compare with the seed's two different roots)"
for cluster in management-plane remote-cluster; do
  echo "$cluster: cert-chain.pem"
  openssl crl2pkcs7 -nocrl -certfile "clusters/$cluster/cacerts/cert-chain.pem" \
    | openssl pkcs7 -print_certs -noout | grep -E '^(subject|issuer)' | sed 's/^/    /'
  printf '    root sha256 %s\n' "$(openssl x509 -in "clusters/$cluster/cacerts/root-cert.pem" -noout -fingerprint -sha256 | cut -d= -f2)"
done
mgmt_root=$(openssl x509 -in clusters/management-plane/cacerts/root-cert.pem -noout -fingerprint -sha256)
remote_root=$(openssl x509 -in clusters/remote-cluster/cacerts/root-cert.pem -noout -fingerprint -sha256)
[ "$mgmt_root" = "$remote_root" ] || { echo "roots differ!" >&2; exit 1; }
echo "    => one root for both meshes"

step "5. Workload certificates, issued from each cluster's intermediate as istiod would"
issue_workload() { # cluster spiffe-id name
  local dir=clusters/$1/workload
  mkdir -p "$dir"
  (umask 077; openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/$3.key" -out "$dir/$3.csr" -subj "/" 2>/dev/null)
  openssl x509 -req -in "$dir/$3.csr" -CA "clusters/$1/cacerts/ca-cert.pem" -CAkey "clusters/$1/cacerts/ca-key.pem" \
    -set_serial "0x$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n' | sed 's/^./4/')" -days 1 -sha256 -out "$dir/$3.pem" \
    -extfile <(printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=critical,URI:%s\n' "$2") 2>/dev/null
  rm -f "$dir/$3.csr"
  # What the sidecar presents: its certificate, then istiod's cert-chain.pem.
  cat "$dir/$3.pem" "clusters/$1/cacerts/cert-chain.pem" > "$dir/$3-chain.pem"
  printf '    %-17s %s\n' "$1" "$(openssl x509 -in "$dir/$3.pem" -noout -ext subjectAltName | tail -1 | sed 's/^ *//')"
}
issue_workload management-plane spiffe://cluster.local/ns/default/sa/bookinfo-reviews reviews
issue_workload remote-cluster spiffe://cluster.local/ns/default/sa/bookinfo-ratings ratings

step "   mTLS between reviews (management-plane) and ratings (remote-cluster)"
port=$(free_port)
# ratings serves, trusting only the root its own cluster was given; it requires a client
# certificate. (Its stdin is held open: s_server stops when stdin closes.)
sleep 30 | openssl s_server -quiet -naccept 1 -accept "127.0.0.1:$port" \
  -cert clusters/remote-cluster/workload/ratings.pem -key clusters/remote-cluster/workload/ratings.key \
  -cert_chain clusters/remote-cluster/cacerts/cert-chain.pem \
  -CAfile clusters/remote-cluster/cacerts/root-cert.pem -Verify 3 -verify_return_error \
  > server.txt 2>&1 &
server_pid=$!
listening() { awk -v p="$(printf ':%04X' "$port")" '$2 ~ p"$" && $4 == "0A" {found=1} END {exit !found}' /proc/net/tcp; }
for _ in $(seq 1 100); do listening && break; sleep 0.05; done
listening || { echo "openssl s_server did not listen within 5 s:" >&2; cat server.txt >&2; exit 1; }
# reviews connects, trusting only the root of its own cluster.
(echo "ping from reviews"; sleep 1) | openssl s_client -connect "127.0.0.1:$port" -showcerts \
  -cert clusters/management-plane/workload/reviews.pem -key clusters/management-plane/workload/reviews.key \
  -cert_chain clusters/management-plane/cacerts/cert-chain.pem \
  -CAfile clusters/management-plane/cacerts/root-cert.pem -verify_return_error > client.txt 2>&1 || true
wait "$server_pid" 2>/dev/null || true
server_pid=""
sed -n '/^Certificate chain/,/^---$/p' client.txt | grep -E '^ *[0-9]+ s:|^ *i:' | sed 's/^/    /'
grep -E 'Verify return code' client.txt | head -1 | sed 's/^/    /'
grep -q 'Verify return code: 0 (ok)' client.txt || { echo "handshake failed:" >&2; cat client.txt server.txt >&2; exit 1; }
grep -q 'ping from reviews' server.txt || { echo "ratings did not accept reviews' certificate:" >&2; cat server.txt >&2; exit 1; }
echo "    => ratings verified reviews' certificate and received: $(grep 'ping from reviews' server.txt)"

step "Stopping the signer (SIGTERM drains in-flight requests)"
kill -TERM "$signer_pid"
wait "$signer_pid"
signer_pid=""
run "$meshca" audit verify audit.log
echo "    decisions:"
# Decision lines only (the start and stop records, which `audit verify` above counts, are not).
sed -nE 's/.*"client":"([^"]*)".*"mesh":"([^"]*)".*"decision":"([^"]*)","rule":"([^"]*)".*/      \3 \4  \1 -> \2/p' audit.log

if [ "$backend" = vault ]; then
  step "Stopping OpenBao (a dev server: everything it held goes with it)"
  stop_openbao
fi

step "Done. Left in $demo_rel:"
if [ "$backend" = pkcs11 ]; then
  cat <<EOF
    signer.toml                  the signer config (meshca serve --config $demo_rel/signer.toml)
    softhsm/softhsm2.conf        for SOFTHSM2_CONF; softhsm/user-pin holds the user PIN
    root-cert.pem                the root; its key never left the token
EOF
else
  cat <<EOF
    signer.toml                  the signer config; it points at the demo's OpenBao
                                 ($BAO_ADDR, a dev server, stopped now)
    ceremony.toml                the same with the ceremony's AppRole (root init, root show)
    openbao/                     role-id and secret-id (AppRole), root-token, openbao.log (0600)
    root-cert.pem                the root; its key never left OpenBao
EOF
fi
cat <<EOF
    pki/                         transport mTLS: ca.pem, signer, management-plane, remote-cluster
    clusters/*/cacerts/          Istio's ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem
    audit.log                    one hash-chained line per decision
EOF
