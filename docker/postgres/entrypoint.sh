#!/bin/sh
# First start: create the cluster, the two databases and their owners (passwords from the environment), and
# Prefect's pg_trgm extension, in single-user mode (nothing listens meanwhile). Every start: run the server.
set -eu
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}" "${PREFECT_DB_PASSWORD:?set PREFECT_DB_PASSWORD}"
quote() { printf "'%s'" "$(printf %s "$1" | sed "s/'/''/g")"; }

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    initdb --pgdata "$PGDATA" --username postgres --auth-local peer --auth-host scram-sha-256 --encoding UTF8 \
        --locale C >/dev/null
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    {
        echo "CREATE ROLE mlflow LOGIN PASSWORD $(quote "$MLFLOW_DB_PASSWORD");"
        echo "CREATE ROLE prefect LOGIN PASSWORD $(quote "$PREFECT_DB_PASSWORD");"
        echo "CREATE DATABASE mlflow OWNER mlflow;"
        echo "CREATE DATABASE prefect OWNER prefect;"
    } | postgres --single -D "$PGDATA" postgres >/dev/null
    echo "CREATE EXTENSION IF NOT EXISTS pg_trgm;" | postgres --single -D "$PGDATA" prefect >/dev/null
    echo "cxr-postgres: created databases mlflow and prefect"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*'
