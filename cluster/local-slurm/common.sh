# Shared by `up` and `down` (sourced, not run). Resolves the state folder and knows the daemons' pid files.
# shellcheck shell=bash

DEFAULT_STATE=${SLURM_LOCAL_STATE:-/tmp/resnet-orchestrator-slurm}

log() { printf '[local-slurm] %s\n' "$*" >&2; }
die() { printf '[local-slurm] ERROR: %s\n' "$*" >&2; exit "${2:-1}"; }

# resolve_state DIR: sets STATE (absolute, as given) and ROOT (the path written into config files).
# SLURM's and MariaDB's config parsers and unix sockets (108 bytes) do not like spaces or long paths, so when
# STATE is not a short plain path, ROOT is a symlink /tmp/local-slurm-<hash> -> STATE; both name the same folder.
resolve_state() {
    local dir=$1
    mkdir -p -- "$dir"
    STATE=$(cd -- "$dir" && pwd -P)
    if [[ $STATE =~ ^[A-Za-z0-9_./+-]+$ ]] && [ ${#STATE} -le 60 ]; then
        ROOT=$STATE
    else
        ROOT=/tmp/local-slurm-$(printf '%s' "$STATE" | sha256sum | cut -c1-12)
        if [ "$(readlink -- "$ROOT" 2>/dev/null)" != "$STATE" ]; then
            [ -e "$ROOT" ] && [ ! -L "$ROOT" ] && die "$ROOT exists and is not our symlink"
            ln -sfnT -- "$STATE" "$ROOT"
        fi
    fi
    RUN=$ROOT/run
    ETC=$ROOT/etc
    LOGS=$ROOT/log
    export SLURM_CONF=$ETC/slurm.conf
}

# name -> "pidfile binary"
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd-n1 slurmd-n2)
pidfile_of() { printf '%s/%s.pid' "$RUN" "$1"; }
binary_of() {
    case $1 in
        munged) echo munged ;; mariadbd) echo mariadbd ;; slurmdbd) echo slurmdbd ;;
        slurmctld) echo slurmctld ;; slurmd-*) echo slurmd ;;
    esac
}

# pid_of NAME: prints the pid if the pid file names a live process running the expected binary (pids get reused).
pid_of() {
    local f pid exe want
    f=$(pidfile_of "$1")
    [ -s "$f" ] || return 1
    pid=$({ tr -dc "0-9" <"$f"; } 2>/dev/null) || return 1
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    exe=${exe% (deleted)}
    exe=${exe##*/}; want=$(binary_of "$1")
    # Debian installs the SLURM daemons as e.g. /usr/sbin/slurmctld-wlm (alternatives)
    [ "$exe" = "$want" ] || [ "$exe" = "$want-wlm" ] || return 1
    # started by `up` for this state folder (not another cluster's daemon that got a recycled pid)
    { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qxF -- "LOCAL_SLURM_DAEMON_OF=$STATE" || return 1
    # a zombie is not alive
    [ "$(awk '/^State:/{print $2}' "/proc/$pid/status" 2>/dev/null)" != Z ] || return 1
    echo "$pid"
}
alive() { pid_of "$1" >/dev/null; }

# Leftovers of this cluster, found without pid files and never by a bare process name:
#  - processes `up` started carry LOCAL_SLURM_DAEMON_OF=<state dir> in their environment (mariadbd, munged, slurm*d);
#  - job step daemons (slurmstepd, started by slurmd with an empty environment) hold the node's log file
#    <state dir>/log/slurmd-nX.log open; their descendants (the job's processes) go with them.
marked_pids() {
    local p pid exe fd roots=() ppid
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [ "$pid" = "$$" ] && continue
        if { tr "\0" "\n" <"$p/environ"; } 2>/dev/null | grep -qxF -- "LOCAL_SLURM_DAEMON_OF=$STATE"; then
            roots+=("$pid"); continue
        fi
        exe=$(readlink "$p/exe" 2>/dev/null) || continue
        exe=${exe##*/}
        [[ $exe == slurmstepd || $exe == slurmstepd-wlm ]] || continue
        for fd in "$p"/fd/*; do
            if [[ $(readlink "$fd" 2>/dev/null) == "$STATE/log/"* ]]; then roots+=("$pid"); break; fi
        done
    done
    [ ${#roots[@]} -gt 0 ] || return 0
    # add descendants: walk the ppid table until no new pid is found
    local -A keep=() parent=()
    for pid in "${roots[@]}"; do keep[$pid]=1; done
    for p in /proc/[0-9]*/stat; do
        read -r pid _ ppid < <(sed 's/^\([0-9]*\) (.*) [A-Za-z] \([0-9]*\).*/\1 x \2/' "$p" 2>/dev/null) || continue
        parent[$pid]=$ppid
    done
    local grew=1
    while [ $grew = 1 ]; do
        grew=0
        for pid in "${!parent[@]}"; do
            if [ -z "${keep[$pid]:-}" ] && [ -n "${keep[${parent[$pid]}]:-}" ] && [ "$pid" != "$$" ]; then keep[$pid]=1; grew=1; fi
        done
    done
    printf '%s\n' "${!keep[@]}"
}
