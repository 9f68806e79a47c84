#!/bin/bash
# A throwaway SLURM cluster on this one machine, for tests: N slurmd "nodes" n1..nN, all at
# 127.0.0.1, each claiming 4 CPUs (no GPUs), and one slurmctld. Debian/Ubuntu, run as root.
#
#   scripts/slurm/local-cluster.sh up DIR [N]    # then: export SLURM_CONF=DIR/slurm.conf
#   scripts/slurm/local-cluster.sh down DIR      # stops the daemons this script started
#
# The ports come from $SLURM_LOCAL_CTLD_PORT (default 6817) and $SLURM_LOCAL_NODE_PORT
# (default 17001, one per node from there), so two clusters can share a machine.
# Exit status 3: slurm-wlm/munge are missing and could not be installed (the caller may skip).
set -euo pipefail

action=${1:?usage: local-cluster.sh up|down DIR [N]}
dir=${2:?usage: local-cluster.sh up|down DIR [N]}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
nodes=${3:-2}

if [ "$action" = down ]; then
  if [ -f "$dir/pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$dir/pids"
    rm -f "$dir/pids"
  fi
  exit 0
fi
[ "$action" = up ] || { echo "unknown action $action (up|down)" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null 2>&1 &&
    ! { apt-get update >/dev/null 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null 2>&1; }; then
    echo "apt-get could not install slurm-wlm and munge" >&2
    exit 3
  fi
fi

# munge authenticates every SLURM message; one munged serves every cluster on the machine.
[ -s /etc/munge/munge.key ] || mungekey -c -f -k /etc/munge/munge.key
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge
chown munge:munge /run/munge
munge -n >/dev/null 2>&1 || runuser -u munge -- /usr/sbin/munged

ctld_port=${SLURM_LOCAL_CTLD_PORT:-6817}
node_port=${SLURM_LOCAL_NODE_PORT:-17001}
host=$(hostname -s)
mkdir -p "$dir"/{state,spool,log,dev}
# cred_expire=5 and sched_interval=2: a requeued job starts again within about 10 s.
cat > "$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
SlurmctldPort=$ctld_port
SlurmdPort=$node_port
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
EOF
for i in $(seq 1 "$nodes"); do
  echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((node_port + i - 1)) CPUs=4 RealMemory=8000 State=UNKNOWN" >> "$dir/slurm.conf"
done
echo "PartitionName=debug Default=YES Nodes=ALL MaxTime=INFINITE State=UP" >> "$dir/slurm.conf"

export SLURM_CONF=$dir/slurm.conf
cd "$dir"
setsid slurmctld -D -i -f "$SLURM_CONF" > "$dir/log/ctld.out" 2>&1 < /dev/null &
echo $! > "$dir/pids"
for i in $(seq 1 "$nodes"); do
  setsid slurmd -D -f "$SLURM_CONF" -N "n$i" > "$dir/log/n$i.out" 2>&1 < /dev/null &
  echo $! >> "$dir/pids"
done
for _ in $(seq 1 150); do # up to 30 s for every node to be idle
  [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | wc -l)" -ge "$nodes" ] && exit 0
  sleep 0.2
done
echo "the cluster did not come up; logs in $dir/log" >&2
sinfo >&2 || true
exit 1
