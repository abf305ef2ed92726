#!/usr/bin/env bash
# A real two-node SLURM 22.05 cluster on this one machine for rlarith's tests: each node is a network
# namespace with its own address, hostname and slurmd; the controller, slurmdbd and MariaDB live in a "head"
# namespace joined to the nodes by a bridge; the filesystem is shared, as on a cluster. Configured as a
# production cluster is where this machine allows (cgroups, core binding, GPUs as GRES, KillWait 30,
# GraceTime on partitions and a QOS, both preempt modes). Debian packages, no systemd; every file it writes
# lives in one folder, every address in namespaces it creates (none in the machine's own).
#
#   slurm/testcluster.sh start    install what is missing (root, apt-get), start what is not running, wait idle
#   slurm/testcluster.sh stop     cancel every job, stop the daemons, remove the namespaces (state is kept)
#   slurm/testcluster.sh status   one line per daemon and node; exit 0 only when everything is up
#   slurm/testcluster.sh env      the `export` lines clients need:  eval "$(slurm/testcluster.sh env)"
#   slurm/testcluster.sh purge    stop, then delete the folder (job ids start again at 1)
#   slurm/testcluster.sh exec NODE CMD...   run CMD "on" a node (its network and hostname)
#   slurm/testcluster.sh kill-node NODE     power loss: link down, then SIGKILL to its slurmd and every job process
#   slurm/testcluster.sh link-down|link-up NODE   take the node's link down (peers see silence, no reset) or up
#   slurm/testcluster.sh revive NODE        link up, slurmd started again, node resumed; waits until it is usable
#
# Layout (RLARITH_SLURM_NNODES=N nodes, default 2, named n1..nN):
#   namespace rlarith-head  10.77.0.1 (rlarith-head): slurmctld, slurmdbd, MariaDB (127.0.0.1 there), bridge
#   namespace rlarith-nK    10.77.0.(10+K) (nK): slurmd -N nK, and every job process that runs on nK
#   munged stays in the machine's namespace: its unix socket crosses network namespaces.
# Client commands (sbatch, squeue, sacct, scontrol, srun, ...) reach the controller only from inside these
# namespaces: `env` puts $RLARITH_SLURM_DIR/bin first on PATH, small wrappers that enter the head namespace
# when called from the machine's own (root only) and run the real command directly on a node (in jobs).
# /etc/hosts holds the head's and nodes' names while the cluster is up.
#
# What production has and this cluster cannot (and why):
#   - real GPUs: each node's GRES `gpu` (4) is backed by character devices made here (major 195, as
#     /dev/nvidia*); SLURM allocates them and sets CUDA_VISIBLE_DEVICES exactly as with real GPUs, but
#     nothing can open them.
#   - separate CPUs: every node believes it owns all of this machine's CPUs (nproc each), so two nodes'
#     tasks bound to "core 0" share one core; masks are real, sharing is not.
#   - memory limits: ConstrainRAMSpace is off (the nodes share one machine's memory; RealMemory is all of it).
#   - production timeouts: SlurmdTimeout is 30 s (not 300) so a dead node is declared in tests' time.
#   - one preempt signal per cluster: preempt_send_user_signal is on, so a job with --signal gets its own
#     signal at preemption (submitit's USR2) and a job without one gets plain SIGTERM (then SIGKILL after
#     KillWait): both kinds of jobs, one cluster.
#   - QOS GraceTime: the QOS `grace` (GraceTime=10) exists for the client side (rlarith's grace budget takes
#     the shorter of partition and QOS), but SLURM uses a QOS's GraceTime only under PreemptType=preempt/qos;
#     here preemption is by partition (the partition's GraceTime applies).
#   - job accounting by cgroup: jobacct_gather/none (no per-step usage; sacct's states are real).
#
# Folder: $RLARITH_SLURM_DIR (default /tmp/rlarith-slurm). Ports (inside the namespaces): slurmctld
# $RLARITH_SLURM_PORT (6817), slurmd +1, slurmdbd +2, MariaDB +9. Why each setting: slurm/README.md.
set -euo pipefail

DIR=${RLARITH_SLURM_DIR:-/tmp/rlarith-slurm}
CTLD_PORT=${RLARITH_SLURM_PORT:-6817}
SLURMD_PORT=$((CTLD_PORT + 1))
DBD_PORT=$((CTLD_PORT + 2))
DB_PORT=$((CTLD_PORT + 9))
NNODES=${RLARITH_SLURM_NNODES:-2}
GPUS=4 # GRES gpu per node
QOS_GRACE_S=10 # the QOS `grace`: shorter than the partitions' 15 s, so a client that ignores it is caught
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server iproute2 util-linux)
WAIT_S=${RLARITH_SLURM_WAIT_S:-60} # per daemon; the first MariaDB/slurmdbd start creates tables
NET=10.77.0
HEAD=rlarith-head # the head's hostname and namespace
HEAD_IP=$NET.1
BRIDGE=rlarith-br
NODES=()
for ((k = 1; k <= NNODES; k++)); do NODES+=("n$k"); done
CONF=$DIR/etc/slurm.conf
DBDCONF=$DIR/etc/slurmdbd.conf
MUNGE_SOCKET=$DIR/munge/munged.sock
DB_SOCKET=$DIR/mysql/mysqld.sock
CLIENTS=(sbatch squeue sacct scontrol scancel sinfo srun salloc sacctmgr sprio sstat sattach sreport sdiag scrontab)
export SLURM_CONF=$CONF # every client and slurmdbd (which has no -f) read it

say() { echo "testcluster: $*"; }
die() {
	echo "testcluster: error: $*" >&2
	exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

node_ip() { echo "$NET.$((10 + ${1#n}))"; }
netns() { echo "rlarith-$1"; } # head or nK
is_node() {
	local n
	for n in "${NODES[@]}"; do [[ $n == "$1" ]] && return 0; done
	return 1
}

# Run a command in a namespace with its own hostname: nsenter for the network (not `ip netns exec`, which
# remounts /sys and hides the cgroup tree), a fresh UTS namespace for the hostname.
in_ns() { # where (head|nK), command...
	local where=$1 host=$1
	shift
	[[ $where == head ]] && host=$HEAD
	nsenter --net="/run/netns/$(netns "$where")" -- unshare --uts -- \
		sh -c 'hostname "$0" && exec "$@"' "$host" "$@"
}
export -f in_ns netns
export HEAD
in_head() { nsenter --net="/run/netns/$(netns head)" -- "$@"; } # a client: the network is enough

# Daemons: name, pid file, log file. comm (/proc/PID/comm) must equal the daemon's name, so a pid file left
# by a killed session that now points at another process is not taken for a live daemon. slurmd@nK is
# node nK's slurmd (comm slurmd).
DAEMONS=(munged mariadbd slurmdbd slurmctld)
for n in "${NODES[@]}"; do DAEMONS+=("slurmd@$n"); done
pidfile() { echo "$DIR/run/${1/@/-}.pid"; }
logfile() { echo "$DIR/log/${1/@/-}.log"; }

pid_of() {
	local pid
	pid=$(cat "$(pidfile "$1")" 2>/dev/null) || return 1
	[[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(cat "/proc/$pid/comm" 2>/dev/null) == "${1%@*}" ]] || return 1
	echo "$pid"
}
alive() { pid_of "$1" >/dev/null; }

fail_daemon() { # name, why
	local log
	log=$(logfile "$1")
	echo "testcluster: error: $1 $2. Last lines of $log:" >&2
	tail -n 25 "$log" 2>/dev/null | sed 's/^/    /' >&2 || echo "    (no log)" >&2
	exit 1
}

wait_for() { # name, description, command...
	local name=$1 what=$2 deadline=$((SECONDS + WAIT_S))
	shift 2
	until "$@" >/dev/null 2>&1; do
		alive "$name" || spawned_alive || fail_daemon "$name" "exited before it was $what"
		((SECONDS < deadline)) || fail_daemon "$name" "was not $what within ${WAIT_S} s"
		sleep 0.2
	done
}

port_open() { in_head bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

need_root() {
	[[ $(id -u) == 0 ]] || die "$1 needs root (namespaces, SlurmUser=root, apt-get); run as root, or ask root to run '$0 start'."
}

install_packages() {
	local missing=() p
	for p in "${PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	need_root "installing ${missing[*]}"
	command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them (Debian 12 has them)."
	local t0 log=/tmp/rlarith-slurm-apt.log
	t0=$(now)
	say "installing ${missing[*]} (apt-get, log $log)"
	export DEBIAN_FRONTEND=noninteractive
	# Package lists may be missing or stale on a fresh machine: update once and retry.
	if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
		apt-get update -q >>"$log" 2>&1 || true
		apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$log" 2>&1 ||
			{ tail -n 15 "$log" >&2; die "apt-get install ${missing[*]} failed (log above, full log $log)."; }
	fi
	say "installed in $(since "$t0") s"
}

mem_mb() { awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo; }

write_if_changed() { # path, mode; content on stdin. Returns 0 when the file changed.
	local tmp
	tmp=$(mktemp "$1.XXXXXX")
	cat >"$tmp"
	chmod "$2" "$tmp"
	if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then
		rm -f "$tmp"
		return 1
	fi
	mv -f "$tmp" "$1"
}

nodelist() { echo "n[1-$NNODES]"; }

write_configs() {
	# Sets SLURM_CONF_CHANGED / DBD_CONF_CHANGED: running daemons read their config only when they start.
	local cpus mem n nodes
	cpus=$(nproc)
	mem=${RLARITH_SLURM_MEM_MB:-$(mem_mb)}
	nodes=$(nodelist)
	SLURM_CONF_CHANGED=0
	DBD_CONF_CHANGED=0
	{
		cat <<EOF
# Written by slurm/testcluster.sh; edits are overwritten at the next start.
ClusterName=rlarith
SlurmctldHost=$HEAD($HEAD_IP)
# Bind to what the hostname resolves to, never to every address (all of them are private anyway).
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
# cred_expire=10: a requeued job is eligible again after ~11 s instead of ~121 s.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
# One slurmd per node on one machine: %n is the node's name.
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$(logfile slurmctld)
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# As in production: a job's processes are tracked by cgroup (a signal goes to the task, not to every
# descendant), tasks are bound to cores, devices outside the job's GRES are hidden.
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
# Look at pending jobs every 2 s, not every 30-60 s: a requeued job starts soon after it is eligible.
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
# A node that stops answering is DOWN after 30 s (production: 300 s), so a node failure fits in a test.
SlurmdTimeout=30
# A node line that differs from the detected hardware never drains the node.
SlurmdParameters=config_overrides
JobRequeue=1
# SIGTERM -> SIGKILL at a job's end, as SLURM's default.
KillWait=30
# Preemption by partition priority: a job in high that needs a node preempts one in low (requeued by SLURM)
# or in lowcancel (cancelled by SLURM; rlarith's driver requeues it itself).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# Preemption sends the job's --signal first; a job without one gets SIGTERM. (Under SchedulerParameters
# this key is accepted and ignored.)
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HEAD
AccountingStoragePort=$DBD_PORT
# With a munge socket of its own, slurmctld finds it for slurmdbd through this key.
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
EOF
		for n in "${NODES[@]}"; do
			echo "NodeName=$n NodeAddr=$(node_ip "$n") NodeHostname=$n CPUs=$cpus RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN"
		done
		cat <<EOF
PartitionName=low Nodes=$nodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 PreemptMode=REQUEUE GraceTime=15
PartitionName=lowcancel Nodes=$nodes MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 PreemptMode=CANCEL GraceTime=15
PartitionName=high Nodes=$nodes MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=10 PreemptMode=OFF
EOF
	} | write_if_changed "$CONF" 644 && SLURM_CONF_CHANGED=1
	{
		echo "# Written by slurm/testcluster.sh. GPUs: character devices made by the script (see its header)."
		echo "AutoDetect=off"
		for n in "${NODES[@]}"; do echo "NodeName=$n Name=gpu File=$DIR/dev/$n/nvidia[0-$((GPUS - 1))]"; done
	} | write_if_changed "$DIR/etc/gres.conf" 644 && SLURM_CONF_CHANGED=1
	write_if_changed "$DIR/etc/cgroup.conf" 644 <<EOF && SLURM_CONF_CHANGED=1
# Written by slurm/testcluster.sh. cgroup v1 (this VM's hierarchy); each slurmd has its tree (slurm_nK).
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=yes
ConstrainDevices=yes
# The nodes share one machine's memory: limits per node would be fiction.
ConstrainRAMSpace=no
EOF
	# slurmdbd has no -f: it reads slurmdbd.conf next to \$SLURM_CONF, and only when it is mode 600.
	write_if_changed "$DBDCONF" 600 <<EOF && DBD_CONF_CHANGED=1
# Written by slurm/testcluster.sh; edits are overwritten at the next start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$HEAD
DbdAddr=$HEAD_IP
DbdPort=$DBD_PORT
CommunicationParameters=NoInAddrAny
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$(logfile slurmdbd)
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF
	return 0
}

# Client wrappers: the real command as is inside one of the cluster's namespaces (on a node, in a job),
# else inside the head's network (from the machine's own: a login node). Only root may enter a namespace.
write_wrappers() {
	local c real n inside
	inside=$(netns head)
	for n in "${NODES[@]}"; do inside+=" $(netns "$n")"; done
	mkdir -p "$DIR/bin"
	for c in "${CLIENTS[@]}"; do
		real=/usr/bin/$c
		[[ -x $real ]] || continue
		write_if_changed "$DIR/bin/$c" 755 <<EOF || true
#!/bin/sh
# Written by slurm/testcluster.sh: $c against the test cluster, whose controller is reachable only inside
# its network namespaces.
self=\$(stat -L -c %i /proc/self/ns/net)
for ns in $inside; do
	[ "\$(stat -c %i /run/netns/\$ns 2>/dev/null)" = "\$self" ] && exec $real "\$@"
done
exec nsenter --net=/run/netns/$(netns head) -- $real "\$@"
EOF
	done
	return 0
}

# /etc/hosts: the head's and nodes' names, between markers, while the cluster is up. Edited in place (it
# may be a bind mount that cannot be replaced).
HOSTS_BEGIN="# rlarith testcluster begin ($DIR)"
HOSTS_END="# rlarith testcluster end"
hosts_without() { awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b { skip = 1 } !skip { print } $0 == e { skip = 0 }' /etc/hosts; }
hosts_add() {
	local want n
	want=$(
		hosts_without
		echo "$HOSTS_BEGIN"
		echo "$HEAD_IP $HEAD"
		for n in "${NODES[@]}"; do echo "$(node_ip "$n") $n"; done
		echo "$HOSTS_END"
	)
	[[ $want == "$(cat /etc/hosts)" ]] || printf '%s\n' "$want" >/etc/hosts
}
hosts_remove() {
	grep -qxF "$HOSTS_BEGIN" /etc/hosts 2>/dev/null || return 0
	local keep
	keep=$(hosts_without)
	printf '%s\n' "$keep" >/etc/hosts
}

ns_exists() { [[ -e /run/netns/$(netns "$1") ]] && ip netns list | grep -qw "$(netns "$1")"; }

# Namespaces, bridge and links; idempotent. The veth pairs are made inside the namespaces: nothing is ever
# added to the machine's own network.
net_up() {
	local n ns
	ns_exists head || ip netns add "$(netns head)"
	ip -n "$(netns head)" link set lo up
	if ! ip -n "$(netns head)" link show "$BRIDGE" >/dev/null 2>&1; then
		ip -n "$(netns head)" link add "$BRIDGE" type bridge
	fi
	ip -n "$(netns head)" addr replace "$HEAD_IP/24" dev "$BRIDGE"
	ip -n "$(netns head)" link set "$BRIDGE" up
	for n in "${NODES[@]}"; do
		ns=$(netns "$n")
		ns_exists "$n" || ip netns add "$ns"
		ip -n "$ns" link set lo up
		if ! ip -n "$(netns head)" link show "$ns" >/dev/null 2>&1; then
			ip -n "$ns" link del eth0 2>/dev/null || true
			ip -n "$(netns head)" link add "$ns" type veth peer name eth0 netns "$ns"
		fi
		ip -n "$(netns head)" link set "$ns" master "$BRIDGE" up
		ip -n "$ns" addr replace "$(node_ip "$n")/24" dev eth0
		ip -n "$ns" link set eth0 up
	done
}

net_down() {
	local n
	for n in "${NODES[@]}" head; do
		ns_exists "$n" && ip netns del "$(netns "$n")"
	done
	return 0
}

# Each node's GPUs: character devices with NVIDIA's major number, one folder per node.
make_gpus() {
	local n i
	for n in "${NODES[@]}"; do
		mkdir -p "$DIR/dev/$n"
		for ((i = 0; i < GPUS; i++)); do
			[[ -c $DIR/dev/$n/nvidia$i ]] || mknod -m 666 "$DIR/dev/$n/nvidia$i" c 195 "$i"
		done
	done
}

# A daemon is started detached (setsid, stdio to its log): a pytest that started the cluster must not
# wait on the daemons' pipes, and a Ctrl-C in its terminal must not reach them. fd 9 is the start lock.
# Every other inherited descriptor is closed too: a start under `flock FILE` (the tests' session lock)
# would otherwise leave the lock held by the daemons for as long as they run.
spawn() { # log, command...
	local log=$1
	shift
	setsid bash -c 'for fd in /proc/$$/fd/*; do fd=${fd##*/}; ((fd > 2)) && eval "exec $fd>&-"; done 2>/dev/null
"$@"' bash "$@" </dev/null >>"$log" 2>&1 9>&- &
	SPAWNED=$!
}
# The spawned process is still there (mariadbd writes its pid file only once it is up).
spawned_alive() {
	local state
	state=$(cut -d' ' -f3 "/proc/$SPAWNED/stat" 2>/dev/null) && [[ $state != Z ]]
}

start_munged() {
	alive munged && return 0
	if [[ ! -f $DIR/munge/munge.key ]]; then
		dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
		chmod 600 "$DIR/munge/munge.key"
	fi
	rm -f "$(pidfile munged)"
	# --force: run as root and take over a socket left by a killed munged.
	spawn "$(logfile munged)" munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
		--pid-file="$(pidfile munged)" --log-file="$(logfile munged)" --seed-file="$DIR/munge/munged.seed"
	local deadline=$((SECONDS + WAIT_S))
	until alive munged && munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; do
		((SECONDS < deadline)) || fail_daemon munged "did not answer on $MUNGE_SOCKET within ${WAIT_S} s"
		sleep 0.1
	done
	STARTED+=(munged)
}

db_sql() { mariadb --no-defaults -S "$DB_SOCKET" -u root -e "$1"; }

start_mariadb() {
	alive mariadbd && return 0
	if [[ ! -d $DIR/mysql/data/mysql ]]; then
		rm -rf "$DIR/mysql/data"
		mariadb-install-db --no-defaults --datadir="$DIR/mysql/data" --user=root --skip-test-db \
			--auth-root-authentication-method=normal >>"$(logfile mariadbd)" 2>&1 ||
			fail_daemon mariadbd "could not initialise $DIR/mysql/data (mariadb-install-db)"
	fi
	rm -f "$(pidfile mariadbd)"
	# innodb_lock_wait_timeout and the buffer pool: what slurmdbd asks for (it logs an error otherwise); the
	# pool is reserved, not touched, so 1G costs little memory.
	spawn "$(logfile mariadbd)" in_ns head mariadbd --no-defaults --user=root --datadir="$DIR/mysql/data" \
		--socket="$DB_SOCKET" --pid-file="$(pidfile mariadbd)" --log-error="$(logfile mariadbd)" \
		--port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --skip-log-bin \
		--innodb-buffer-pool-size=1G --innodb-lock-wait-timeout=900 --innodb-flush-log-at-trx-commit=2
	wait_for mariadbd "accepting connections" mariadb-admin --no-defaults -S "$DB_SOCKET" -u root ping
	chmod 644 "$(pidfile mariadbd)" # mode 660 by default: other users' `start` and `status` read it
	# Every start, not only the first: a first start killed here would leave a database without the user.
	db_sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
		fail_daemon mariadbd "refused to create the slurm user"
	STARTED+=(mariadbd)
}

start_slurm_daemon() { # name, readiness description, readiness command...
	local name=$1
	shift
	alive "$name" && return 0
	rm -f "$(pidfile "$name")"
	case $name in
	slurmdbd) spawn "$(logfile "$name")" in_ns head slurmdbd ;;
	slurmctld) spawn "$(logfile "$name")" in_ns head slurmctld -f "$CONF" ;;
	slurmd@*) spawn "$(logfile "$name")" in_ns "${name#*@}" slurmd -f "$CONF" -N "${name#*@}" ;;
	esac
	# The daemons fork; the pid file appears once they are up.
	local deadline=$((SECONDS + WAIT_S))
	until alive "$name"; do
		spawned_alive || [[ -s $(pidfile "$name") ]] || fail_daemon "$name" "exited before it wrote its pid file"
		((SECONDS < deadline)) || fail_daemon "$name" "did not write its pid file within ${WAIT_S} s"
		sleep 0.1
	done
	wait_for "$name" "$@"
	STARTED+=("$name")
}

# The QOS `grace` with its GraceTime, as this script says (kept in the accounting database across starts).
ensure_qos() {
	if ! qos_ready; then
		in_head sacctmgr -i add qos grace >/dev/null || fail_daemon slurmdbd "refused to add the QOS 'grace'"
	fi
	[[ $(in_head sacctmgr -n -P show qos grace format=GraceTime 2>/dev/null) == "$(printf '00:00:%02d' "$QOS_GRACE_S")" ]] ||
		in_head sacctmgr -i modify qos where name=grace set GraceTime="$QOS_GRACE_S" >/dev/null
}

cluster_registered() { in_head sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx rlarith; }
qos_ready() { in_head sacctmgr -n -P list qos grace format=name 2>/dev/null | grep -qx grace; }
ctld_up() { in_head scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state() { in_head sinfo -h -N -n "$1" -o %T 2>/dev/null | head -n1; }
node_usable() { [[ $(node_state "$1") =~ ^(idle|mixed|allocated|completing)$ ]]; }
nodes_usable() {
	local n
	for n in "${NODES[@]}"; do node_usable "$n" || return 1; done
}

wait_node() { # node
	local node=$1 deadline=$((SECONDS + WAIT_S)) state resumed=0
	until node_usable "$node"; do
		state=$(node_state "$node")
		# A node drained or down from an earlier session (say, a job killed with the daemons) is given back.
		if [[ $state =~ drain|down ]] && ((!resumed)) && alive "slurmd@$node"; then
			in_head scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
			resumed=1
		fi
		alive "slurmd@$node" || fail_daemon "slurmd@$node" "exited before node $node was up"
		((SECONDS < deadline)) || fail_daemon "slurmd@$node" "left node $node '${state:-unknown}' for ${WAIT_S} s"
		sleep 0.2
	done
}

stop_daemon() { # name
	local pid i
	pid=$(pid_of "$1") || {
		rm -f "$(pidfile "$1")"
		return 0
	}
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do
		[[ -d /proc/$pid ]] || break
		sleep 0.1
	done
	if [[ -d /proc/$pid ]]; then
		kill -KILL "$pid" 2>/dev/null || true
		say "$1 (pid $pid) ignored SIGTERM for 10 s: killed"
	fi
	rm -f "$(pidfile "$1")"
	STOPPED+=("$1")
}

# Every process "on" a node: those in its network namespace (slurmd, slurmstepd, the jobs' tasks).
node_pids() { ip netns pids "$(netns "$1")" 2>/dev/null || true; }

# Empty cgroup folders of a node's slurmd (slurm_nK under each controller), deepest first.
cgroups_clean() { # node
	local d
	for d in /sys/fs/cgroup/*/slurm_"$1"; do
		[[ -d $d ]] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
	done
	return 0
}

# Two test sessions starting at once: the second waits, then finds the cluster up.
lock() {
	mkdir -p "$DIR"
	{ exec 9>>"$DIR/.lock"; } 2>/dev/null || exec 9<"$DIR/.lock"
	flock 9
}

all_up() {
	local d
	for d in "${DAEMONS[@]}"; do alive "$d" || return 1; done
	nodes_usable
}

cmd_start() {
	local t0 n
	t0=$(now)
	lock
	# Fast path: everything running with the config this script writes (only root can rewrite it).
	if all_up 2>/dev/null; then
		[[ $(id -u) == 0 ]] && write_configs && write_wrappers && hosts_add && ensure_qos
		if [[ $(id -u) != 0 ]] || ((!SLURM_CONF_CHANGED && !DBD_CONF_CHANGED)); then
			say "already running (${NODES[*]}, SLURM_CONF=$CONF)"
			return 0
		fi
	fi
	install_packages
	need_root "starting the cluster"
	mkdir -p "$DIR"/{etc,munge,mysql,state,spool,run,log,dev}
	chown 0:0 "$DIR" # a test session of another user may have made it (for its lock file)
	# Clients of other users reach the munge socket only through o+x folders.
	chmod 755 "$DIR" "$DIR/munge" "$DIR/etc"
	chmod 700 "$DIR/mysql"
	[[ -n ${SLURM_CONF_CHANGED:-} ]] || write_configs
	write_wrappers
	make_gpus
	net_up
	hosts_add
	STARTED=()
	STOPPED=()
	# A changed config reaches running daemons only through a restart.
	if ((DBD_CONF_CHANGED)) && alive slurmdbd; then stop_daemon slurmdbd; fi
	if ((SLURM_CONF_CHANGED)); then
		for n in "${NODES[@]}"; do alive "slurmd@$n" && stop_daemon "slurmd@$n"; done
		alive slurmctld && stop_daemon slurmctld
	fi
	((${#STOPPED[@]} == 0)) || say "config changed: restarting ${STOPPED[*]}"
	start_munged
	start_mariadb
	start_slurm_daemon slurmdbd "listening on $HEAD_IP:$DBD_PORT" port_open "$HEAD_IP" "$DBD_PORT"
	start_slurm_daemon slurmctld "answering (scontrol ping)" ctld_up
	# slurmd is ready when its node is (a probe of its port would only put errors in its log).
	for n in "${NODES[@]}"; do start_slurm_daemon "slurmd@$n" "running" true; done
	for n in "${NODES[@]}"; do wait_node "$n"; done
	# slurmctld adds the cluster to the accounting database when it first registers.
	wait_for slurmdbd "holding cluster 'rlarith' (sacctmgr list cluster)" cluster_registered
	ensure_qos
	if ((${#STARTED[@]})); then say "started ${STARTED[*]} (logs in $DIR/log)"; fi
	say "up in $(since "$t0") s: nodes ${NODES[*]} (CPUs=$(nproc), gpu:$GPUS each); partitions low (PreemptMode=REQUEUE)," \
		"lowcancel (PreemptMode=CANCEL), both PriorityTier=1 GraceTime=15 s, and high (PriorityTier=10); QOS grace (GraceTime=$QOS_GRACE_S)"
	say "clients: eval \"\$($0 env)\"   (SLURM_CONF=$CONF; PATH gets $DIR/bin)"
}

cmd_stop() {
	lock
	STOPPED=()
	# Jobs would outlive slurmd (slurmstepd keeps them running): cancel them while slurmctld is there.
	if alive slurmctld && ctld_up; then
		local jobs i
		jobs=$(in_head squeue -h -o %i 2>/dev/null | tr '\n' ' ')
		if [[ -n ${jobs// /} ]]; then
			# shellcheck disable=SC2086
			in_head scancel $jobs 2>/dev/null || true
			for ((i = 0; i < 200; i++)); do
				[[ -z $(in_head squeue -h -o %i 2>/dev/null) ]] && break
				sleep 0.2
			done
			say "cancelled jobs $jobs"
		fi
	fi
	local i n pids
	for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[i]}"; done
	# Whatever is still running on a node (a job step left by a killed slurmd) goes with it.
	for n in "${NODES[@]}"; do
		pids=$(node_pids "$n")
		# shellcheck disable=SC2086
		[[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
	done
	sleep 0.2
	for n in "${NODES[@]}"; do cgroups_clean "$n"; done
	net_down
	hosts_remove
	if ((${#STOPPED[@]})); then say "stopped ${STOPPED[*]} (state kept in $DIR)"; else say "not running"; fi
}

cmd_status() {
	local d pid ok=0 n
	for d in "${DAEMONS[@]}"; do
		if pid=$(pid_of "$d"); then echo "$d: running (pid $pid)"; else
			echo "$d: not running"
			ok=1
		fi
	done
	for n in "${NODES[@]}"; do
		if alive slurmctld && node_usable "$n"; then echo "node $n ($(node_ip "$n")): $(node_state "$n")"; else
			echo "node $n: $(alive slurmctld && node_state "$n" || echo 'no controller')"
			ok=1
		fi
	done
	if alive slurmctld; then in_head sinfo -o '%P %a %l %D %T %c %m %G' 2>/dev/null | sed 's/^/  /'; fi
	echo "SLURM_CONF=$CONF"
	return $ok
}

cmd_env() {
	local path=${PATH:-/usr/bin:/bin}
	[[ $path == "$DIR/bin:"* ]] || path=$DIR/bin:$path
	echo "export SLURM_CONF=$CONF"
	echo "export RLARITH_SLURM_DIR=$DIR"
	echo "export RLARITH_SLURM_PORT=$CTLD_PORT"
	echo "export RLARITH_SLURM_NODES=$(IFS=,; echo "${NODES[*]}")"
	echo "export PATH=$path"
}

cmd_purge() {
	cmd_stop
	[[ $DIR == /* && $DIR != / ]] || die "refusing to delete '$DIR'"
	rm -rf "$DIR"
	say "deleted $DIR"
}

need_node() {
	is_node "${1:-}" || die "no node '${1:-}': the nodes are ${NODES[*]}."
	ns_exists "$1" || die "node $1 has no namespace: is the cluster up? ($0 start)"
}

cmd_exec() { # node, command...
	need_node "${1:-}"
	local node=$1
	shift
	(($#)) || die "usage: $0 exec NODE COMMAND..."
	in_ns "$node" "$@"
}

link() { ip -n "$(netns head)" link set "$(netns "$1")" "$2"; } # the node's end of the bridge

cmd_kill_node() { # node: what a power loss looks like to the others
	need_node "${1:-}"
	local pids
	link "$1" down # first, so that no FIN or RST from the dying processes reaches the other nodes
	pids=$(node_pids "$1")
	# shellcheck disable=SC2086
	[[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
	rm -f "$(pidfile "slurmd@$1")"
	say "node $1: link down, killed ${pids:-nothing}" | tr '\n' ' '
	echo
}

cmd_revive() { # node
	need_node "${1:-}"
	local pids
	pids=$(node_pids "$1")
	if [[ -n $pids ]] && ! alive "slurmd@$1"; then
		# shellcheck disable=SC2086
		kill -KILL $pids 2>/dev/null || true
		sleep 0.2
	fi
	link "$1" up
	STARTED=()
	start_slurm_daemon "slurmd@$1" "running" true
	wait_node "$1"
	say "node $1: $(node_state "$1")"
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) cmd_env ;;
purge) cmd_purge ;;
exec) cmd_exec "${@:2}" ;;
kill-node) cmd_kill_node "${2:-}" ;;
link-down) need_node "${2:-}" && link "$2" down ;;
link-up) need_node "${2:-}" && link "$2" up ;;
revive) cmd_revive "${2:-}" ;;
*)
	echo "usage: $0 start|stop|status|env|purge|exec NODE CMD...|kill-node NODE|link-down NODE|link-up NODE|revive NODE" >&2
	echo "       (folder: $DIR, from RLARITH_SLURM_DIR; nodes: ${NODES[*]}, from RLARITH_SLURM_NNODES)" >&2
	exit 2
	;;
esac
