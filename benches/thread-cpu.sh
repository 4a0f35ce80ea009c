#!/usr/bin/env bash
# Per-thread CPU and context switches of running processes, over a few
# seconds: what each thread of `quiverd`, the benchmark client or
# `redis-server` costs while a benchmark runs.
#
#   benches/thread-cpu.sh 'quiverd|write_throughput' [seconds]
#
# Prints, per thread: voluntary and involuntary context switches per second
# and CPU as a percentage of one core (user + system, from
# /proc/<pid>/task/<tid>/stat). Threads that used no CPU are left out.
set -euo pipefail
pattern=${1:?usage: thread-cpu.sh <pgrep -f pattern> [seconds]}
seconds=${2:-2}
ticks=$(getconf CLK_TCK)

snapshot() {
    for pid in $(pgrep -f "$pattern"); do
        for task in /proc/"$pid"/task/*; do
            [ -r "$task/stat" ] || continue
            local vol invol cpu
            vol=$(awk '/^voluntary_ctxt_switches/ {print $2}' "$task/status" 2>/dev/null || echo 0)
            invol=$(awk '/^nonvoluntary_ctxt_switches/ {print $2}' "$task/status" 2>/dev/null || echo 0)
            # Fields 14 and 15 (utime, stime) follow the command name, which
            # may hold spaces: count from after its closing parenthesis.
            cpu=$(sed 's/.*) //' "$task/stat" | awk '{print $12 + $13}')
            echo "$pid/$(basename "$task") $(tr ' ' '_' < "$task/comm") $vol $invol $cpu"
        done
    done | sort
}

before=$(snapshot)
sleep "$seconds"
after=$(snapshot)
printf '%-14s %-18s %10s %10s %8s\n' "pid/tid" "thread" "vol/s" "invol/s" "cpu %"
join <(echo "$before") <(echo "$after") | awk -v s="$seconds" -v hz="$ticks" '{
    cpu = ($9 - $5) / hz / s * 100
    if (cpu > 0) printf "%-14s %-18s %10d %10d %8.1f\n", $1, $2, ($7 - $3) / s, ($8 - $4) / s, cpu
}'
