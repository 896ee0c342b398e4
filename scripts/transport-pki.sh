#!/usr/bin/env bash
# The mTLS transport PKI between the signer and the clusters' agents, made with the
# openssl CLI. (In production this is your existing PKI: cert-manager, SPIRE, ...; it is
# separate from the mesh root that meshca protects.)
#
#   transport-pki.sh ca     DIR                 -> DIR/ca.pem, DIR/ca.key
#   transport-pki.sh server DIR NAME [DAYS]     -> DIR/NAME.pem/.key (localhost, 127.0.0.1;
#                                                 a negative DAYS as for client)
#   transport-pki.sh client DIR NAME URI [DAYS] -> DIR/NAME.pem/.key (URI SAN, clientAuth;
#                                                 a negative DAYS makes an expired certificate,
#                                                 valid from 2*|DAYS| until |DAYS| days ago)
#   transport-pki.sh revoke DIR NAME            -> revokes DIR/NAME.pem, rewrites DIR/crl.pem
#
# Keys are written mode 0600.
set -euo pipefail
umask 077
cmd=${1:?usage: transport-pki.sh ca|server|client DIR ...}
dir=${2:?DIR missing}
mkdir -p "$dir"

serial() { echo "0x$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n' | sed 's/^./4/')"; }

issue() { # name subject days extensions
  local name=$1 subject=$2 days=$3 extensions=$4
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "$subject" 2>/dev/null
  if [ "$days" -ge 0 ]; then
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
      -set_serial "$(serial)" -days "$days" -sha256 \
      -extfile <(printf '%s\n' "$extensions") -out "$dir/$name.pem" 2>/dev/null
  else
    issue_expired "$name" "$days" "$extensions"
  fi
  rm -f "$dir/$name.csr"
  chmod 644 "$dir/$name.pem"
}

# An expired certificate: valid from 2*|DAYS| days ago until |DAYS| days ago. (`openssl
# x509 -days -N` would put notAfter before notBefore, a certificate valid at no time; only
# `openssl ca` takes a start date in OpenSSL 3.0.)
issue_expired() { # name days extensions
  local name=$1 days=$2 extensions=$3
  local db="$dir/$name.expired-ca"
  mkdir -p "$db"
  : > "$db/index.txt"
  # Required by the config, though -rand_serial does not read it.
  echo 1000 > "$db/serial"
  cat > "$db/ca.cnf" <<CNF
[ ca ]
default_ca = expired
[ expired ]
database = $db/index.txt
serial = $db/serial
new_certs_dir = $db
default_md = sha256
policy = any
unique_subject = no
copy_extensions = none
[ any ]
commonName = supplied
CNF
  openssl ca -batch -config "$db/ca.cnf" -cert "$dir/ca.pem" -keyfile "$dir/ca.key" \
    -rand_serial -notext -preserveDN -in "$dir/$name.csr" -out "$dir/$name.pem" \
    -startdate "$(date -u -d "$((2 * days)) days" +%Y%m%d%H%M%SZ)" \
    -enddate "$(date -u -d "$days days" +%Y%m%d%H%M%SZ)" \
    -extfile <(printf '%s\n' "$extensions") 2>/dev/null
  rm -rf "$db"
}

case "$cmd" in
  ca)
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -keyout "$dir/ca.key" -out "$dir/ca.pem" -days 3650 -sha256 \
      -subj "/O=meshca demo/CN=meshca transport CA" \
      -addext "basicConstraints=critical,CA:true,pathlen:0" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    chmod 644 "$dir/ca.pem"
    ;;
  server)
    name=${3:?NAME missing}
    days=${4:-825}
    issue "$name" "/CN=$name" "$days" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1"
    ;;
  client)
    name=${3:?NAME missing}
    uri=${4:?URI missing}
    days=${5:-825}
    issue "$name" "/CN=$name" "$days" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectAltName=URI:$uri"
    ;;
  revoke)
    name=${3:?NAME missing}
    if [ ! -f "$dir/ca.cnf" ]; then
      cat > "$dir/ca.cnf" <<CNF
[ ca ]
default_ca = CA_default
[ CA_default ]
dir = $dir
database = \$dir/index.txt
crlnumber = \$dir/crlnumber
certificate = \$dir/ca.pem
private_key = \$dir/ca.key
default_md = sha256
default_crl_days = 30
CNF
      : > "$dir/index.txt"
      echo 1000 > "$dir/crlnumber"
    fi
    openssl ca -config "$dir/ca.cnf" -revoke "$dir/$name.pem" 2>/dev/null
    openssl ca -config "$dir/ca.cnf" -gencrl -out "$dir/crl.pem" 2>/dev/null
    chmod 644 "$dir/crl.pem"
    ;;
  *)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
