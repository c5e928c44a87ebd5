#!/usr/bin/env bash
# Start a real Slurm cluster on this one machine: slurmctld plus emulated nodes, each a slurmd on
# its own port, with munge auth and PMIx for `srun --mpi=pmix`:
#   partition debug (default): n1, n2 without GPUs;
#   partition gpu: n3, n4 with HPCDL_SLURM_GPUS (default 2) emulated GPUs each, none if 0.
# Emulated GPUs are Slurm GRES backed by placeholder character devices (NVIDIA's major 195,
# nothing behind them, never opened) in $BASE/dev: Slurm allocates, binds and exports them
# (CUDA_VISIBLE_DEVICES, SLURM_STEP_GPUS) as on a GPU cluster; TensorFlow sees no GPU.
# Idempotent: installs what is missing (as root), starts only daemons that are not running.
# Prints `export SLURM_CONF=...` for the caller. Stop with slurm-down.sh (stops only these).
set -euo pipefail
BASE=${HPCDL_SLURM_DIR:-/tmp/hpcdl-slurm}
# The default path, as on a real cluster: Snakemake's Slurm job-step plugin drops SLURM_CONF
# from the environment of the srun calls it makes inside jobs. Never clobber a real config.
CONF=/etc/slurm/slurm.conf
MARK="# written by hpcdl tests/cluster/slurm-up.sh"
GRES_CONF=/etc/slurm/gres.conf
HOST=$(hostname -s)
GPUS=${HPCDL_SLURM_GPUS:-2}
[[ $GPUS =~ ^[0-9]+$ ]] || { echo "[slurm-up] HPCDL_SLURM_GPUS=$GPUS: expected a number" >&2; exit 2; }
NODES=(n1 n2)
((GPUS)) && NODES+=(n3 n4)
log() { printf '[slurm-up] %s\n' "$*" >&2; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

need=()
for pkg in slurm-wlm munge libpmix-dev openmpi-bin; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
  [[ $(id -u) -eq 0 ]] || { log "run as root, or: apt-get install ${need[*]}"; exit 1; }
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi

if [[ -f $CONF ]] && ! grep -qxF "$MARK" "$CONF"; then
  log "$CONF exists and is not ours: refusing to replace a real cluster's configuration"
  exit 1
fi
if [[ -f $GRES_CONF ]] && ! grep -qxF "$MARK" "$GRES_CONF"; then
  log "$GRES_CONF exists and is not ours: refusing to replace a real cluster's configuration"
  exit 1
fi
mkdir -p "$BASE"/{state,log,run} /etc/slurm
for node in "${NODES[@]}"; do mkdir -p "$BASE/spool/$node" "$BASE/tmp/$node"; done
if [[ ! -s /etc/munge/munge.key ]]; then
  log "creating a munge key"
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! pgrep -x munged >/dev/null; then
  # munged runs as munge: its pid file goes in a directory munge owns, or it cannot be
  # written and slurm-down.sh would leave the daemon running
  mkdir -p "$BASE/run/munge" && chown munge:munge "$BASE/run/munge"
  runuser -u munge -- /usr/sbin/munged --pid-file="$BASE/run/munge/munged.pid"
fi

mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 3 ))
gpu_conf=""
rm -f "$GRES_CONF"  # ours (checked above): a stale one without GresTypes breaks slurmd
if ((GPUS)); then
  rm -rf "$BASE/dev" && mkdir -p "$BASE/dev"
  for ((i = 0; i < GPUS; i++)); do mknod "$BASE/dev/nvidia$i" c 195 "$i"; done
  printf '%s\nNodeName=n[3-4] Name=gpu File=%s/dev/nvidia[0-%d]\n' \
    "$MARK" "$BASE" "$((GPUS - 1))" > "$GRES_CONF"
  gpu_conf="GresTypes=gpu
NodeName=n[3-4] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[6823-6824] CPUs=2 RealMemory=$mem_mb Gres=gpu:$GPUS State=UNKNOWN
PartitionName=gpu Nodes=n[3-4] MaxTime=INFINITE State=UP DefMemPerCPU=1000"
fi
cat > "$CONF" <<CONFEOF
$MARK
ClusterName=hpcdl-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire + 1 s (default 120 s): keep tests short
AuthInfo=cred_expire=30
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=300
KillWait=10
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
TmpFS=$BASE/tmp/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[6821-6822] CPUs=2 RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1000
$gpu_conf
CONFEOF

export SLURM_CONF=$CONF
alive "$BASE/run/slurmctld.pid" || { log "starting slurmctld"; slurmctld -f "$CONF"; }
for node in "${NODES[@]}"; do
  alive "$BASE/run/slurmd-$node.pid" || { log "starting slurmd $node"; slurmd -N "$node" -f "$CONF"; }
done
for _ in $(seq 100); do
  if [[ $(sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)') -eq ${#NODES[@]} ]]; then
    log "cluster up: $(sinfo -h -o '%P %D %T' | tr '\n' ' ')"
    echo "export SLURM_CONF=$CONF"
    exit 0
  fi
  scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume >/dev/null 2>&1 || true
  sleep 0.2
done
log "nodes did not come up:"; sinfo -N >&2 || true; tail -20 "$BASE"/log/*.log >&2
exit 1
