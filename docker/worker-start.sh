#!/bin/sh
# The `worker` service: make sure the work pool, this image's deployments (prefect.yaml, loaded from /app) and
# the crashed-run automation exist on the Prefect server, then poll the pool.
set -eu
pool="${CXR_WORK_POOL:-cxr}"
prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process
prefect --no-prompt deploy --all --pool "$pool"
# A flow run whose process dies with its container sends no final state: without heartbeats it would show
# Running for ever. The automation marks it Crashed when its heartbeats stop (PREFECT_FLOWS_HEARTBEAT_FREQUENCY).
prefect automation inspect "crash-silent-flow-runs" >/dev/null 2>&1 \
    || prefect automation create --from-file docker/crash-zombie-flows.yaml
exec prefect worker start --pool "$pool" --name "worker-$(hostname)" --with-healthcheck
