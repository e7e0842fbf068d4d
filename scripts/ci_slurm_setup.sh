#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost for tests/test_slurm.py (DESIGN.md §7: "a real Slurm
# controller for the SLURM path"). Installs slurmctld/slurmd/slurm-client/munge from apt when missing,
# writes a slurm.conf for one node (NodeAddr 127.0.0.1), starts munged, slurmctld and slurmd in the background, and waits
# until the node takes jobs. Idempotent: a cluster that already answers `sinfo` with an idle node is left
# alone, so running it twice is safe. Needs root (apt, daemons). Exit 0 with one clear line at the end.
# The node's NodeName does not resolve in DNS (NodeAddr=127.0.0.1), as on many cloud and elastic clusters: jobs
# must reach the head node by its NodeAddr, never by its name.
#
#   bash scripts/ci_slurm_setup.sh            # install if needed, configure, start, wait
#   bash scripts/ci_slurm_setup.sh --stop     # stop the daemons this script started
#
# Layout: config /etc/slurm/slurm.conf (written only if absent or made by this script: marker line),
# state, spool, pid and log files under $RECYCLEGPT_SLURM_DIR (default /var/tmp/recyclegpt-slurm).
set -euo pipefail

BASE=${RECYCLEGPT_SLURM_DIR:-/var/tmp/recyclegpt-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# recyclegpt local test cluster (scripts/ci_slurm_setup.sh)"
NODE=rg-node-without-dns   # a NodeName no resolver knows; slurmctld reaches it at NodeAddr
say() { echo "ci_slurm_setup: $*"; }
die() { echo "ci_slurm_setup: error: $*" >&2; exit 1; }

stop_daemons() {
  local name pid
  for name in slurmd slurmctld; do
    pid=$(cat "$BASE/$name.pid" 2>/dev/null || true)
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      say "stopped $name (pid $pid)"
    fi
  done
}

node_ready() {   # the partition answers and the node is idle/mixed/allocated (not down/drained)
  local state
  state=$(timeout 10 sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -1) || return 1
  [[ "$state" =~ ^(idle|mixed|allocated|completing)$ ]]
}

if [[ "${1:-}" == "--stop" ]]; then stop_daemons; exit 0; fi
[[ $(id -u) == 0 ]] || die "must run as root (installs packages, starts slurmctld/slurmd as SlurmUser=root)"

# ----------------------------------------------------------------------------------------- already up?
# A cluster that answers and was not configured by us (a real one, or a CI image's) is used as it is.
if command -v sinfo >/dev/null && [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF" && node_ready; then
  say "an existing Slurm cluster answers: $(sinfo -h -o '%P %D %T' | head -1); using it as it is"
  exit 0
fi

# ----------------------------------------------------------------------------------------- install
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  say "installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d in containers refuses to start services during install; that is fine, we start them below.
  apt-get update -q >/dev/null || die "apt-get update failed"
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
    || die "apt-get install slurmctld slurmd slurm-client munge failed"
fi

# ----------------------------------------------------------------------------------------- munge
if [[ ! -s /etc/munge/munge.key ]]; then
  say "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then mungekey --create --force --keyfile=/etc/munge/munge.key >/dev/null
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge; chown munge:munge /run/munge; chmod 755 /run/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  rm -f /run/munge/munged.pid
  runuser -u munge -- munged || die "munged did not start; see /var/log/munge/munged.log"
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n </dev/null | unmunge >/dev/null || die "munge round trip fails after starting munged"
fi

# ----------------------------------------------------------------------------------------- slurm.conf
if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
  die "$CONF exists and was not written by this script; not touching it (a real cluster?). Move it away to use the local test cluster."
fi
CPUS=$(nproc); (( CPUS < 2 )) && CPUS=2   # 2 tasks on one node is the test's shape
mkdir -p "$BASE"/{state,spool,log} /etc/slurm
NEW_CONF=$(mktemp)
cat >"$NEW_CONF" <<CONF
$MARKER
ClusterName=recyclegpt
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s, minimum 5).
AuthInfo=cred_expire=5
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
# No cgroups (containers): processes tracked through /proc, no task binding, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# One node, a handful of jobs: look at pending (e.g. just requeued) jobs every second, not every 30/60 s.
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Use the CPU count below even where the machine reports fewer (a 1-core CI box still runs 2 tasks).
SlurmdParameters=config_overrides
ReturnToService=2
# Reject at submission a job that can never run here (e.g. --nodes 2), instead of leaving it pending.
EnforcePartLimits=ALL
SlurmdTimeout=60
KillWait=10
MinJobAge=900
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$(hostname) CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
if ! cmp -s "$NEW_CONF" "$CONF" 2>/dev/null; then
  install -m 644 "$NEW_CONF" "$CONF"
  say "wrote $CONF"
  stop_daemons   # a running daemon would keep the old configuration
  sleep 1
fi
rm -f "$NEW_CONF"

# ----------------------------------------------------------------------------------------- daemons
running() { [[ -f "$BASE/$1.pid" ]] && kill -0 "$(cat "$BASE/$1.pid")" 2>/dev/null; }
if running slurmctld && running slurmd && node_ready; then
  say "Slurm cluster already up: $(sinfo -h -o '%P %D node(s) %c CPUs %T' | head -1); nothing to do"
  exit 0
fi
if ! running slurmctld; then
  # -c: start with no jobs. This is a test cluster; a job left pending or requeued when the daemons were last
  # killed (end of a session) must not come back and hold the node while the tests wait for theirs.
  say "starting slurmctld with an empty queue (log $BASE/log/slurmctld.log)"
  slurmctld -c || die "slurmctld did not start; see $BASE/log/slurmctld.log"
fi
if ! running slurmd; then
  say "starting slurmd (log $BASE/log/slurmd.log)"
  slurmd -N "$NODE" || die "slurmd did not start; see $BASE/log/slurmd.log"
fi

for _ in $(seq 60); do
  node_ready && break
  # A node left DOWN/DRAINED by an earlier run (e.g. killed daemons) is put back in service.
  state=$(timeout 10 sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -1 || true)
  if [[ "$state" =~ (down|drain) ]]; then scontrol update nodename="$NODE" state=resume 2>/dev/null || true; fi
  sleep 1
done
node_ready || die "the node did not become idle within 60 s: $(sinfo -N -l 2>&1 | tail -2); logs in $BASE/log"
say "Slurm cluster up: partition $(sinfo -h -o '%P %D node(s) %c CPUs %T' | head -1); logs in $BASE/log"
