#!/usr/bin/env bash
# Runs one benchmark past the device tool's 10-minute limit on a command: `start` launches it in a new
# process session (the device machine keeps such a process running between calls for as long as it stays
# warm, i.e. while the calls follow each other), `wait` blocks up to N seconds for it to end.
#   bash bench/detached.sh start NAME -- COMMAND [ARGS...]   # returns at once; the log is $DIR/NAME/log
#   bash bench/detached.sh wait NAME SECONDS                 # exit 0 when it ended (its exit status shown),
#                                                            # 3 when still running after SECONDS
# DIR is $DETACHED_DIR or /tmp/longloom-detached. Export the environment the job needs (NCCL settings,
# PYTHONPATH) before `start`: the job inherits it. Example for the 8B's longest on 2 GPUs, over two calls:
#   call 1: bash bench/detached.sh start s512 -- python3 bench/e2e.py --gpus 2 --seq-lens 524288 ... ;
#           bash bench/detached.sh wait s512 560
#   call 2: bash bench/detached.sh wait s512 560
set -uo pipefail
dir=${DETACHED_DIR:-/tmp/longloom-detached}
action=${1:-}
name=${2:-}
if [ -z "$name" ] || { [ "$action" != start ] && [ "$action" != wait ]; }; then
  echo "usage: $0 start NAME -- COMMAND... | $0 wait NAME SECONDS" >&2
  exit 2
fi
job=$dir/$name
case $action in
  start)
    shift 2
    [ "${1:-}" = "--" ] && shift
    if [ $# -eq 0 ]; then echo "$0 start $name: no command after --" >&2; exit 2; fi
    if [ -f "$job/pid" ] && [ ! -f "$job/rc" ]; then
      echo "$0 start $name: a job of that name is still running (pid $(cat "$job/pid")); wait for it or pick another name" >&2
      exit 2
    fi
    rm -rf "$job" && mkdir -p "$job"
    # setsid: a new session, so the job outlives this command; rc is written when it ends, however it ends.
    setsid bash -c 'cd "$1" && shift && "$@"; echo $? > "'"$job"'/rc"' _ "$PWD" "$@" > "$job/log" 2>&1 < /dev/null &
    echo $! > "$job/pid"
    echo "started $name (pid $!): $*; log $job/log"
    ;;
  wait)
    seconds=${3:-}
    if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then echo "$0 wait $name: SECONDS must be a whole number (got '$seconds')" >&2; exit 2; fi
    if [ ! -f "$job/pid" ]; then echo "$0 wait $name: no such job in $dir (start it first)" >&2; exit 2; fi
    deadline=$((SECONDS + seconds))
    while [ ! -f "$job/rc" ] && [ $SECONDS -lt $deadline ]; do sleep 2; done
    tail -n "${TAIL_LINES:-20}" "$job/log"
    if [ -f "$job/rc" ]; then
      echo "$name ended: exit $(cat "$job/rc")"
      exit 0
    fi
    echo "$name still running after ${seconds} s (pid $(cat "$job/pid")); wait again in the next call"
    exit 3
    ;;
esac
