#!/usr/bin/env bash
# End-to-end check in a throw-away kind cluster; see e2e/README.md. Not run by CI.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${CLUSTER:-breakwater-e2e}"
VERSION="$(awk -F'"' '/^version = / {print $2; exit}' Cargo.toml)"
IMAGE="ghcr.io/breakwater/breakwater:${VERSION}"
KEEP="${KEEP:-0}"

for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null 2>&1 || { echo "e2e: $tool is required" >&2; exit 2; }
done

step() { printf '\n=== %s\n' "$*"; }
fail() { echo "e2e: FAILED: $*" >&2; exit 1; }
cleanup() {
    if [[ "$KEEP" != 1 ]]; then
        kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

step "cluster $CLUSTER"
kind get clusters 2>/dev/null | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kubectl config use-context "kind-$CLUSTER" >/dev/null

step "image $IMAGE"
docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "CRD"
kubectl apply -f crds/resiliencepolicy.yaml
kubectl wait --for=condition=Established crd/resiliencepolicies.breakwater.io --timeout=60s
# The API server itself enforces the CEL rule perTry <= request.
if kubectl apply --dry-run=server -f - >/dev/null 2>&1 <<'POLICY'
apiVersion: breakwater.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: cel-check, namespace: default}
spec:
  backends: [{name: a, url: "http://127.0.0.1:1"}]
  timeouts: {perTry: 20s, request: 10s}
POLICY
then
    fail "the API server accepted perTry > request"
fi

step "operator"
kubectl apply -f manifests/operator.yaml
kubectl -n breakwater-system rollout status deploy/breakwater-operator --timeout=180s
holder="$(kubectl -n breakwater-system get lease breakwater-operator -o jsonpath='{.spec.holderIdentity}')"
[[ -n "$holder" ]] || fail "no operator holds the lease"
echo "lease held by $holder"

step "demo app with the sidecar"
kubectl apply -f manifests/examples/demo-app.yaml
kubectl apply -f manifests/sidecar-rbac.yaml
kubectl apply -f manifests/examples/policy-basic.yaml
kubectl -n demo rollout status deploy/checkout --timeout=180s

step "policy status"
accepted=""
for _ in $(seq 60); do
    accepted="$(kubectl -n demo get rp checkout -o jsonpath='{.status.conditions[?(@.type=="Accepted")].status}')"
    [[ "$accepted" == True ]] && break
    sleep 2
done
[[ "$accepted" == True ]] || fail "policy checkout not Accepted (got '$accepted')"
kubectl -n demo get rp

step "traffic through the sidecar"
kubectl -n demo run curl --rm -i --restart=Never --image=curlimages/curl:8.10.1 -- \
    curl -fsS --max-time 5 http://checkout.demo.svc/ | tee /dev/stderr | grep -q "hello from checkout" ||
    fail "no answer from the app through the sidecar"

step "an invalid edit is reported and the old configuration keeps serving"
# An empty status range passes the schema (a string) but not the compiler.
kubectl -n demo patch rp checkout --type=merge \
    -p '{"spec":{"healthCheck":{"path":"/","expectedStatuses":["200-199"]}}}'
message=""
for _ in $(seq 60); do
    message="$(kubectl -n demo get rp checkout -o jsonpath='{.status.conditions[?(@.type=="Accepted")].message}')"
    [[ "$message" == *"spec.healthCheck.expectedStatuses[0]"* ]] && break
    sleep 2
done
[[ "$message" == *"spec.healthCheck.expectedStatuses[0]"* ]] || fail "Accepted=False with the field path expected, got '$message'"
kubectl -n demo run curl2 --rm -i --restart=Never --image=curlimages/curl:8.10.1 -- \
    curl -fsS --max-time 5 http://checkout.demo.svc/ | grep -q "hello from checkout" ||
    fail "traffic stopped after an invalid edit"

step "injection webhook"
# The plain manifests leave the serving certificate to the user: make one as the README does.
command -v openssl >/dev/null 2>&1 || fail "openssl is required to make the webhook certificate"
tls="$(mktemp -d)"
svc=breakwater-operator.breakwater-system.svc
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=breakwater-webhook-ca" \
    -keyout "$tls/ca.key" -out "$tls/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=$svc" -keyout "$tls/tls.key" -out "$tls/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:%s.cluster.local\n' "$svc" "$svc" >"$tls/san.ext"
openssl x509 -req -in "$tls/tls.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 1 -extfile "$tls/san.ext" -out "$tls/tls.crt" 2>/dev/null
kubectl -n breakwater-system create secret tls breakwater-webhook-tls \
    --cert="$tls/tls.crt" --key="$tls/tls.key" --dry-run=client -o yaml | kubectl apply -f -
sed "s|^    clientConfig:\$|&\n      caBundle: $(base64 -w0 <"$tls/ca.crt")|" manifests/webhook.yaml | kubectl apply -f -
# The kubelet syncs the Secret into the running operators within a minute or so; a server-side
# dry run goes through the webhook without creating anything.
containers=""
for _ in $(seq 60); do
    containers="$(kubectl -n demo run inject-check --image=busybox:1.36 \
        --annotations=breakwater.io/inject=true --dry-run=server \
        -o jsonpath='{.spec.containers[*].name}' 2>/dev/null || true)"
    [[ "$containers" == *breakwater* ]] && break
    sleep 3
done
[[ "$containers" == *breakwater* ]] || fail "no sidecar injected into a dry-run pod (containers: '$containers')"
kubectl -n demo run injected --image=busybox:1.36 --restart=Never \
    --annotations=breakwater.io/inject=true -- sleep 3600
containers="$(kubectl -n demo get pod injected -o jsonpath='{.spec.containers[*].name}')"
[[ "$containers" == "injected breakwater" ]] || fail "expected the app and the sidecar, got '$containers'"
injected="$(kubectl -n demo get pod injected -o jsonpath='{.metadata.annotations.breakwater\.io/injected}')"
[[ "$injected" == "$VERSION" ]] || fail "breakwater.io/injected should be $VERSION, got '$injected'"
kubectl -n demo wait --for=condition=Ready pod/injected --timeout=120s
kubectl -n demo delete pod injected --wait=false

step "e2e passed"
