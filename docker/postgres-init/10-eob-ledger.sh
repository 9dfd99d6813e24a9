#!/usr/bin/env bash
# Run by the postgres image once, when its data volume is first initialised (files in
# /docker-entrypoint-initdb.d). Airflow's metadata lives in POSTGRES_DB; the EOB delivery
# ledger gets its own role and database so pipeline data never shares a schema with Airflow.
# The ledger's tables are created by the pipeline itself (Alembic, on first connection).
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v eob_password="$EOB_DB_PASSWORD" <<'SQL'
CREATE ROLE eob LOGIN PASSWORD :'eob_password';
CREATE DATABASE eob OWNER eob;
SQL
