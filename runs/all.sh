#!/usr/bin/env bash
# Every experiment, one after the other.
set -euo pipefail
here=$(dirname "$0")
"$here/balance.sh"
"$here/dense.sh"
"$here/mtp.sh"
"$here/yarn.sh"
