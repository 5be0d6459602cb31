#!/bin/sh
# One-shot before `n8n start`: fill the shipped credential template from the environment,
# import it and the workflow, activate the workflow (applies at n8n's next start).
set -eu
umask 077
node /aigen/n8n-credentials.js /aigen/n8n/credentials.template.json > /tmp/credentials.json
n8n import:credentials --input=/tmp/credentials.json
rm -f /tmp/credentials.json
n8n import:workflow --input=/aigen/n8n/workflow.json
n8n update:workflow --id=AigenGenerateJob --active=true
