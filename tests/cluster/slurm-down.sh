#!/usr/bin/env bash
# Stop the cluster slurm-up.sh started: cancel its jobs, stop its daemons (by their pid files),
# remove its gres.conf (a stale one breaks the next slurmd without GresTypes) and its devices.
set -uo pipefail
BASE=${HPCDL_SLURM_DIR:-/tmp/hpcdl-slurm}
[[ -f /etc/slurm/slurm.conf ]] && scancel --full --quiet --user="$(id -un)" 2>/dev/null
for pidfile in "$BASE"/run/slurmd-*.pid "$BASE"/run/slurmctld.pid "$BASE"/run/munge/munged.pid; do
  [[ -f $pidfile ]] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null && for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$pidfile"
done
MARK="# written by hpcdl tests/cluster/slurm-up.sh"
grep -qxF "$MARK" /etc/slurm/gres.conf 2>/dev/null && rm -f /etc/slurm/gres.conf
rm -rf "$BASE/dev"
echo "[slurm-down] stopped" >&2
