#!/usr/bin/env bash
# Gives the mesh controller a kubeconfig for a member cluster, or renews it: issues a bound,
# expiring token for the member's meshca-mesh-controller ServiceAccount (TokenRequest, as
# `kubectl create token` does; deploy/mesh-controller/member/ must be applied there), and
# writes a kubeconfig with it and the member's CA into a Secret of the management cluster
# (server-side apply: created, or replaced in place). The controller reads the Secret at
# every pass, so a renewal needs no restart. Run it again before the token ends (the
# duration below, or less where the API server caps it: the end is printed), from cron or
# CI; a token that ended fails the member (MemberFailed, then MeshcaVirtualMeshNotReady).
#
# The token is never on a command line and never printed; only the Secret holds it.
#
# Usage: member-kubeconfig.sh MEMBER_CONTEXT SERVER SECRET [DURATION]
#   MEMBER_CONTEXT  kubectl context of the member cluster
#   SERVER          its API server URL as the management cluster's pods reach it
#   SECRET          the Secret the Mesh's spec.kubeconfigSecret names (its key: kubeconfig);
#                   the controller's Role must name it (rbac.yaml, secrets resourceNames)
#   DURATION        the token's lifetime (default 720h)
# Environment: MANAGEMENT_CONTEXT (default: kubectl's current context), NAMESPACE (of the
# ServiceAccount and of the Secret, default service-mesh-hub), KUBECTL (default kubectl).
set -euo pipefail
if [ $# -lt 3 ] || [ $# -gt 4 ]; then
  echo "usage: member-kubeconfig.sh MEMBER_CONTEXT SERVER SECRET [DURATION]" >&2
  exit 2
fi
member=$1 server=$2 secret=$3 duration=${4:-720h}
namespace=${NAMESPACE:-service-mesh-hub}
kubectl=${KUBECTL:-kubectl}
management=()
[ -n "${MANAGEMENT_CONTEXT:-}" ] && management=(--context "$MANAGEMENT_CONTEXT")
case "$server" in
  https://*) ;;
  *) echo "member-kubeconfig.sh: SERVER must be an https:// URL (got $server)" >&2; exit 2 ;;
esac

token=$("$kubectl" --context "$member" -n "$namespace" create token meshca-mesh-controller \
  --duration "$duration")
# The CA that signs the member's API server certificate, as every namespace gets it.
ca=$("$kubectl" --context "$member" -n "$namespace" get configmap kube-root-ca.crt \
  -o 'jsonpath={.data.ca\.crt}')
if [ -z "$token" ] || [ -z "$ca" ]; then
  echo "member-kubeconfig.sh: no token or no CA from context $member" >&2
  exit 1
fi
b64() { base64 | tr -d '\n'; }

# When the token ends: its exp claim (the API server may have shortened the duration).
claims=$(printf '%s' "$token" | cut -d. -f2 | tr '_-' '/+')
while [ $(( ${#claims} % 4 )) -ne 0 ]; do claims="$claims="; done
exp=$(printf '%s' "$claims" | base64 -d 2>/dev/null | sed -n 's/.*"exp":\([0-9]*\).*/\1/p')

kubeconfig="apiVersion: v1
kind: Config
clusters:
- name: member
  cluster:
    server: $server
    certificate-authority-data: $(printf '%s\n' "$ca" | b64)
users:
- name: meshca-mesh-controller
  user:
    token: $token
contexts:
- name: member
  context:
    cluster: member
    user: meshca-mesh-controller
current-context: member
"
# Server-side apply (no last-applied annotation, which would copy the kubeconfig into
# the Secret's metadata), taking the key over from whoever created the Secret.
printf 'apiVersion: v1
kind: Secret
metadata:
  name: %s
  namespace: %s
type: Opaque
data:
  kubeconfig: %s
' "$secret" "$namespace" "$(printf '%s' "$kubeconfig" | b64)" \
  | "$kubectl" ${management[@]+"${management[@]}"} apply --server-side --force-conflicts \
      --field-manager meshca-member-kubeconfig -f - >/dev/null
if [ -n "$exp" ]; then
  until=$(date -u -d "@$exp" +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || date -u -r "$exp" +%Y-%m-%dT%H:%M:%SZ)
  echo "Secret $namespace/$secret: kubeconfig for $server, token valid until $until"
else
  echo "Secret $namespace/$secret: kubeconfig for $server (the token's end could not be read)"
fi
