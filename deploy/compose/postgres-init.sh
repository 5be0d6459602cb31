#!/bin/sh
# First start of the postgres container only: n8n's own role (with a password, n8n needs one)
# and database, next to the orchestrator's.
set -eu
psql -v ON_ERROR_STOP=1 -v pw="$N8N_DB_PASSWORD" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE n8n LOGIN PASSWORD :'pw';
CREATE DATABASE n8n OWNER n8n;
SQL
