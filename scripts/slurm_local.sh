#!/usr/bin/env bash
# A real Slurm cluster on this machine, without systemd (CI, laptops, dev VMs): one node for the
# machine itself (partition debug) and, where the kernel lets root create network namespaces, two
# more nodes lbn1 and lbn2 (partition multi), each a slurmd in its own network and UTS namespace
# (its own hostname and IP, 10.77.0.11 and .12) on a private bridge lbbr0 (10.77.0.1, the
# controller's address). Traffic stays on this machine; `stop` removes the bridge and namespaces.
# A 2-node job (`sbatch -p multi -N 2`) then rendezvouses across hosts as on a real cluster.
#
#   bash scripts/slurm_local.sh start    install packages if needed, configure, start munged/slurmctld/slurmd
#   bash scripts/slurm_local.sh status   daemons, sinfo, squeue
#   bash scripts/slurm_local.sh smoke    sbatch --wrap, a job array, srun -n2, and the sacct shim
#   bash scripts/slurm_local.sh stop     cancel all jobs, stop the daemons via their pid files
#
# Needs root and a Debian/Ubuntu host (apt). Uses Debian's slurmctld/slurmd/slurm-client/munge,
# SlurmUser=root, proctrack/linuxproc and task/none: no cgroups, so --mem and CPU binding are not
# enforced. `start` is a no-op when the cluster already answers; it begins with an empty job table
# (slurmctld -c), so job ids restart: use a fresh submitit/Hydra folder per CI run.
# Background and pitfalls: shared/notes/slurm_local.md.
#
# Knobs (environment):
#   SLURM_CI_CPUS=4            CPUs the node advertises. Default 4 even on a 2-core machine
#                              (oversubscribed via SlurmdParameters=config_overrides), so that a
#                              2-job x 2-rank sweep or 4 array tasks run at once. Set to $(nproc) for
#                              honest scheduling.
#   SLURM_CI_PARTITION=debug   partition name (Default=YES, MaxTime=INFINITE)
#   SLURM_CI_STATE=/var/spool/slurm-local   state, spool, logs and pid files
#   SLURM_CI_CRED_EXPIRE=10    AuthInfo cred_expire (s); a requeued job waits this long (Slurm: 120)
#   SLURM_CI_SACCT_SHIM=1      install scripts/sacct_shim.py as /usr/local/bin/sacct when no real
#                              sacct works (no slurmdbd here; submitit hangs on dead jobs without it)
#   SLURM_CI_WAIT_S=30         how long `start` waits for the node to become idle
#   SLURM_CI_NET_NODES=2       namespace nodes in partition multi (0: none). When they cannot be
#                              made (no CAP_NET_ADMIN, no `ip`), `start` says why, writes the reason
#                              to $STATE/net_nodes.unavailable and starts the single node only.
set -euo pipefail

CPUS=${SLURM_CI_CPUS:-4}
PARTITION=${SLURM_CI_PARTITION:-debug}
STATE=${SLURM_CI_STATE:-/var/spool/slurm-local}
CRED_EXPIRE=${SLURM_CI_CRED_EXPIRE:-10}
SACCT_SHIM=${SLURM_CI_SACCT_SHIM:-1}
WAIT_S=${SLURM_CI_WAIT_S:-30}
NET_NODES=${SLURM_CI_NET_NODES:-2}

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# written by lowbit scripts/slurm_local.sh"
MUNGE_RUN=/run/munge
MUNGE_PID=$MUNGE_RUN/munged.pid
CTLD_PID=$STATE/run/slurmctld.pid
NODE=$(hostname -s)
SLURMD_PID=$STATE/run/slurmd-$NODE.pid   # SlurmdPidFile=$STATE/run/slurmd-%n.pid
BRIDGE=lbbr0
NET_PREFIX=10.77.0
NET_WHY=$STATE/net_nodes.unavailable
HOSTS_MARK="# lowbit slurm_local net node"
SHIM_DST=/usr/local/bin/sacct
SHIM_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/sacct_shim.py"

log() { printf '[slurm_local] %s\n' "$*"; }
die() { printf '[slurm_local] ERROR: %s\n' "$*" >&2; exit 1; }

pid_alive() {  # pid_alive PIDFILE -> 0 when the file names a live process
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

cluster_up() { timeout 5 sinfo -h >/dev/null 2>&1; }

node_state() { timeout 5 sinfo -h -n "${1:-$NODE}" -o '%T' 2>/dev/null | head -n1; }

install_packages() {
    local need=()
    for bin in slurmctld slurmd sinfo munged; do
        command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
    done
    [[ ${#need[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "missing ${need[*]}; run as root to install slurmctld slurmd slurm-client munge"
    command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get: install Slurm and munge by hand"
    export DEBIAN_FRONTEND=noninteractive
    local pkgs=(slurmctld slurmd slurm-client munge)
    if ! apt-cache show "${pkgs[@]}" >/dev/null 2>&1; then
        log "apt-get update"
        timeout 300 apt-get update -q || die "apt-get update failed"
    fi
    log "apt-get install -y --no-install-recommends ${pkgs[*]}"
    timeout 600 apt-get install -y -q --no-install-recommends "${pkgs[@]}" || die "apt-get install failed"
}

ensure_hostname() {
    if ! getent hosts "$NODE" >/dev/null; then
        log "adding '127.0.0.1 $NODE' to /etc/hosts (slurmd and MASTER_ADDR need the short hostname)"
        printf '127.0.0.1 %s\n' "$NODE" >>/etc/hosts
    fi
}

net_names() { local i; for ((i = 1; i <= NET_NODES; i++)); do echo "lbn$i"; done; }

net_nodes_on() { [[ $NET_NODES -gt 0 && ! -e $NET_WHY ]]; }

net_down() {  # remove the namespaces, the bridge and the hosts lines (idempotent)
    local n kept
    for n in $(net_names); do
        ip netns del "$n" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    if grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
        # /etc/hosts may be a bind mount (containers): rewrite it in place, never replace the file
        kept=$(grep -vF "$HOSTS_MARK" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

net_up() {  # the bridge and one namespace per net node; on failure: the reason in $NET_WHY, return 1
    local i n why=""
    rm -f "$NET_WHY"
    if [[ $NET_NODES == 0 ]]; then
        echo "SLURM_CI_NET_NODES=0: no namespace nodes asked for" >"$NET_WHY"
        return 0
    fi
    [[ $NET_NODES =~ ^[0-9]+$ && $NET_NODES -le 8 ]] || die "SLURM_CI_NET_NODES must be 0-8, got '$NET_NODES'"
    command -v ip >/dev/null || why="no 'ip' command (Debian package iproute2)"
    command -v unshare >/dev/null || why=${why:-"no 'unshare' command (util-linux)"}
    if [[ -z $why ]]; then
        net_down
        if ! { ip link add "$BRIDGE" type bridge && ip addr add "$NET_PREFIX.1/24" dev "$BRIDGE" &&
            ip link set "$BRIDGE" up; } 2>"$STATE/log/net_up.err"; then
            why="cannot create bridge $BRIDGE: $(head -c 300 "$STATE/log/net_up.err") (needs CAP_NET_ADMIN)"
        fi
    fi
    for ((i = 1; i <= NET_NODES; i++)); do
        [[ -z $why ]] || break
        n=lbn$i
        if ! { ip netns add "$n" && ip link add "lbv$i" type veth peer name eth0 netns "$n" &&
            ip link set "lbv$i" master "$BRIDGE" up && ip -n "$n" addr add "$NET_PREFIX.$((10 + i))/24" dev eth0 &&
            ip -n "$n" link set eth0 up && ip -n "$n" link set lo up; } 2>"$STATE/log/net_up.err"; then
            why="cannot create network namespace $n: $(head -c 300 "$STATE/log/net_up.err")"
        elif ! nsenter --net="/run/netns/$n" unshare --uts true 2>"$STATE/log/net_up.err"; then
            why="cannot create a UTS namespace in $n: $(head -c 300 "$STATE/log/net_up.err")"
        else
            printf '%s %s %s\n' "$NET_PREFIX.$((10 + i))" "$n" "$HOSTS_MARK" >>/etc/hosts
        fi
    done
    if [[ -n $why ]]; then
        net_down
        printf '%s\n' "$why" >"$NET_WHY"
        log "no namespace nodes: $why; starting the single node only"
        return 1
    fi
    log "namespace nodes $(net_names | paste -sd' ' -) on bridge $BRIDGE ($NET_PREFIX.0/24)"
}

start_net_slurmds() {
    local n
    net_nodes_on || return 0
    for n in $(net_names); do
        if pid_alive "$STATE/run/slurmd-$n.pid"; then
            log "slurmd $n already running (pid $(<"$STATE/run/slurmd-$n.pid"))"
            continue
        fi
        log "starting slurmd $n in its network and UTS namespaces"
        mkdir -p "$STATE/slurmd/$n"
        # its own hostname: gloo/NCCL and MASTER_ADDR resolve it to the namespace's address
        # nsenter, not `ip netns exec`: the latter remounts /sys, hiding /sys/fs/cgroup from slurmd
        timeout 30 nsenter --net="/run/netns/$n" unshare --uts sh -c "hostname $n && exec slurmd -N $n" ||
            die "slurmd $n failed; see $STATE/log/slurmd-$n.log"
    done
}

start_munge() {
    getent passwd munge >/dev/null || die "user 'munge' missing (the munge package creates it)"
    mkdir -p "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chown munge:munge "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chmod 0755 "$MUNGE_RUN"
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if pid_alive "$MUNGE_PID" && timeout 5 munge -n </dev/null | timeout 5 unmunge >/dev/null 2>&1; then
        log "munged already running (pid $(<"$MUNGE_PID"))"
        return 0
    fi
    log "starting munged"
    rm -f "$MUNGE_RUN"/munge.socket.2* "$MUNGE_PID"
    timeout 10 runuser -u munge -- /usr/sbin/munged --force || die "munged failed to start (see /var/log/munge/munged.log)"
    local i
    for ((i = 0; i < 20; i++)); do
        timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

write_conf() {
    local mem_mb
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    [[ $CPUS =~ ^[0-9]+$ && $CPUS -ge 1 ]] || die "SLURM_CI_CPUS must be a positive integer, got '$CPUS'"
    mkdir -p "$CONF_DIR" "$STATE"/{ctld,slurmd/"$NODE",log,run}
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        local bak
        bak="$CONF.bak.$(date +%s)"
        log "backing up foreign $CONF to $bak"
        cp -p "$CONF" "$bak"
    fi
    log "writing $CONF (NodeName=$NODE CPUs=$CPUS on $(nproc) cores, RealMemory=$mem_mb MB)"
    local ctl_host=$NODE
    if net_nodes_on; then ctl_host="$NODE($NET_PREFIX.1)"; fi  # the namespace nodes reach it on the bridge
    cat >"$CONF" <<EOF
$MARKER
ClusterName=lowbit-local
SlurmctldHost=$ctl_host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
ReturnToService=2
MinJobAge=3600
KillWait=10
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
NodeName=$NODE CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    if net_nodes_on; then
        local i
        for ((i = 1; i <= NET_NODES; i++)); do
            echo "NodeName=lbn$i NodeAddr=$NET_PREFIX.$((10 + i)) NodeHostname=lbn$i CPUs=2 RealMemory=$((mem_mb / 4)) State=UNKNOWN" >>"$CONF"
        done
        echo "PartitionName=multi Nodes=$(net_names | paste -sd, -) MaxTime=INFINITE State=UP OverSubscribe=NO" >>"$CONF"
    fi
}

install_sacct_shim() {
    [[ $SACCT_SHIM == 1 ]] || { log "SLURM_CI_SACCT_SHIM=$SACCT_SHIM: not installing the sacct shim"; return 0; }
    local cand
    # A real sacct (slurmdbd configured) wins; Debian's /usr/bin/sacct exits 1 here.
    while read -r cand; do
        [[ $cand == "$SHIM_DST" ]] && continue
        if timeout 10 "$cand" -n -X -o JobID -j 1 >/dev/null 2>&1; then
            log "a working sacct exists ($cand): not installing the shim"
            return 0
        fi
    done < <(type -ap sacct | awk '!seen[$0]++')
    [[ -f $SHIM_SRC ]] || die "sacct shim source missing: $SHIM_SRC"
    log "installing sacct shim $SHIM_DST (answers from scontrol; no slurmdbd here)"
    { echo '#!/usr/bin/python3'; tail -n +2 "$SHIM_SRC"; } >"$SHIM_DST.tmp"
    chmod 0755 "$SHIM_DST.tmp"
    mv -f "$SHIM_DST.tmp" "$SHIM_DST"
}

wait_idle() {  # wait_idle [NODE]
    local i st="" node=${1:-$NODE}
    for ((i = 0; i < WAIT_S * 2; i++)); do
        st=$(node_state "$node" || true)
        case $st in
            idle | mixed | allocated) log "node $node is $st after ~$((i / 2)) s"; return 0 ;;
            drain* | down*)
                # e.g. a stale DOWN from an old state file: resume it once
                timeout 5 scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    timeout 5 sinfo -R 2>/dev/null || true
    die "node $node not idle after ${WAIT_S}s (state '${st:-no answer}'); see $STATE/log/slurmctld.log and slurmd-$node.log"
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "start needs root"
    if pid_alive "$CTLD_PID" && pid_alive "$SLURMD_PID" && cluster_up; then
        log "already running (slurmctld $(<"$CTLD_PID"), slurmd $(<"$SLURMD_PID")): nothing to do"
        install_sacct_shim
        return 0
    fi
    install_packages
    ensure_hostname
    start_munge
    if pid_alive "$CTLD_PID"; then
        log "slurmctld already running (pid $(<"$CTLD_PID"))"
    else
        mkdir -p "$STATE"/{log,run}
        net_up || true
        write_conf
        log "starting slurmctld -c (empty job table)"
        timeout 30 slurmctld -c || die "slurmctld failed; see $STATE/log/slurmctld.log"
    fi
    if pid_alive "$SLURMD_PID"; then
        log "slurmd already running (pid $(<"$SLURMD_PID"))"
    else
        log "starting slurmd"
        timeout 30 slurmd || die "slurmd failed; see $STATE/log/slurmd-$NODE.log"
    fi
    start_net_slurmds
    wait_idle
    if net_nodes_on; then
        local n
        for n in $(net_names); do wait_idle "$n"; done
    fi
    install_sacct_shim
    timeout 5 sinfo
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
    local pid i
    if ! pid_alive "$2"; then
        log "$1 not running"
        rm -f "$2"
        return 0
    fi
    pid=$(<"$2")
    log "stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$2"; return 0; }
        sleep 0.25
    done
    log "$1 (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$2"
}

cmd_stop() {
    local ids i
    if cluster_up; then
        ids=$(timeout 5 squeue -h -t PD,R,CG,S,CF,RQ,RS,SE -o '%A' 2>/dev/null | sort -u | tr '\n' ' ')
        if [[ -n ${ids// /} ]]; then
            log "cancelling jobs: $ids"
            # shellcheck disable=SC2086  # word splitting of the id list is intended
            timeout 10 scancel $ids || true
            for ((i = 0; i < 30; i++)); do
                [[ -z $(timeout 5 squeue -h -t R,CG -o '%A' 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_pidfile slurmd "$SLURMD_PID"
    local n
    for n in $(net_names); do
        if [[ -e $STATE/run/slurmd-$n.pid ]]; then stop_pidfile "slurmd $n" "$STATE/run/slurmd-$n.pid"; fi
    done
    net_down
    stop_pidfile slurmctld "$CTLD_PID"
    stop_pidfile munged "$MUNGE_PID"
    # daemons whose pid file was lost are not ours to stop by name (they may be another
    # checkout's or the machine's own): say so and leave them
    local name
    for name in slurmd slurmctld munged; do
        if command -v pgrep >/dev/null && pgrep -x "$name" >/dev/null; then
            log "warning: a $name without our pid file is still running (pids $(pgrep -x "$name" | tr '\n' ' ')); not stopped"
        fi
    done
    if command -v pgrep >/dev/null && pgrep -x slurmstepd >/dev/null; then
        log "warning: slurmstepd still running (pids $(pgrep -x slurmstepd | tr '\n' ' ')); its job escaped cleanup"
    fi
    log "stopped"
}

cmd_status() {
    local name f
    for name in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
        f=${name#*:}
        if pid_alive "$f"; then log "${name%%:*}: running (pid $(<"$f"))"; else log "${name%%:*}: not running"; fi
    done
    if cluster_up; then
        timeout 5 sinfo
        timeout 5 squeue -t all
    else
        log "sinfo does not answer"
        return 1
    fi
}

cmd_smoke() {
    local dir t0 jid out
    cluster_up || die "cluster not running: bash scripts/slurm_local.sh start"
    dir=$(mktemp -d /tmp/slurm_smoke.XXXXXX)
    cd "$dir"
    t0=$SECONDS
    log "smoke in $dir"
    log "1/4 sbatch --wait --wrap hostname"
    out=$(timeout 60 sbatch --parsable --wait -o wrap.out --wrap hostname) || die "sbatch --wrap failed"
    jid=${out%%;*}
    [[ $(<wrap.out) == "$NODE" ]] || die "job $jid printed '$(<wrap.out)', expected '$NODE'"
    log "2/4 sbatch --wait --array=0-3"
    # shellcheck disable=SC2016  # $SLURM_ARRAY_TASK_ID expands in the job, not here
    timeout 90 sbatch --wait --array=0-3 -o 'arr_%a.out' --wrap 'echo task=$SLURM_ARRAY_TASK_ID; sleep 1' >/dev/null ||
        die "array job failed"
    for t in 0 1 2 3; do grep -qx "task=$t" "arr_$t.out" || die "array task $t output missing"; done
    log "3/4 srun -n2 -l hostname"
    out=$(timeout 60 srun -n2 -l hostname | sort) || die "srun -n2 failed"
    [[ $out == "0: $NODE"$'\n'"1: $NODE" ]] || die "srun -n2 printed: $out"
    log "4/4 sacct -j $jid"
    out=$(timeout 15 sacct -o JobID,State,NodeList --parsable2 -j "$jid") || die "sacct failed"
    grep -q "^$jid|COMPLETED|" <<<"$out" || die "sacct did not report $jid COMPLETED: $out"
    if net_nodes_on && timeout 5 sinfo -h -p multi >/dev/null 2>&1; then
        log "5/5 srun -p multi -N2 -l hostname (two namespace nodes)"
        out=$(timeout 60 srun -p multi -N2 -l hostname | sort) || die "srun -p multi -N2 failed"
        [[ $out == "0: lbn1"$'\n'"1: lbn2" ]] || die "srun -p multi -N2 printed: $out"
    fi
    log "smoke passed in $((SECONDS - t0)) s"
    cd / && rm -rf "$dir"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    smoke) cmd_smoke ;;
    *) echo "usage: $0 start|stop|status|smoke" >&2; exit 2 ;;
esac
