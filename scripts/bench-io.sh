#!/usr/bin/env bash
# The I/O benchmark of the aggregate VM (docs/aggregate-vm.md, "The I/O
# path"): the Debian system image on 2 nodes (fragvisor-tcg, 4 vCPUs, 1 GiB),
# each figure measured with the guest process that does the I/O pinned to
# an origin vCPU (CPU 1) and to a node-1 vCPU (CPU 2), and their ratio:
#
#   ab      the guest's nginx (one worker, pinned; the NIC's receive IRQ on
#           the same CPU) serving 1 KiB, 64 KiB and 1 MiB files to ab on the
#           host through the user-net port forward, concurrency 4:
#           requests/s and the median (p50) latency;
#   fio     a second virtio-blk disk (a 1 GiB scratch image), direct I/O,
#           libaio, queue depth 4, --fio-seconds each (5): 4 KiB random read and write IOPS, 1 MiB
#           sequential read and write MB/s;
#   boot    launcher start to ssh-ready for 1, 2 and 4 nodes (one run each
#           unless --boot-runs).
#
# Each ab/fio figure is the median of --runs runs (default 3). Ratios are
# named <figure>_remote_vs_origin and are "remote's speed over origin's":
# remote/origin for rates, origin/remote for latencies, so 1.0 means the
# same and the goal (>= 0.8) reads the same way for every figure. The last
# line of stdout is the JSON; progress goes to stderr.
#
#   scripts/bench-io.sh [--runs N] [--boot-runs N] [--no-boot] [--fio-seconds S]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib/common.sh
. "$here/lib/common.sh"
cd "$FV_ROOT"

runs=3 boot_runs=1 do_boot=1 fio_s=5
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs=$2; shift 2 ;;
        --boot-runs) boot_runs=$2; shift 2 ;;
        --no-boot) do_boot=; shift ;;
        --fio-seconds) fio_s=$2; shift 2 ;;
        *) fv_die "unknown option $1 (see the header of $0)" ;;
    esac
done

fv_apt_install_retry apache2-utils openssh-client python3 bc
fv_need_cargo
qemu=$(scripts/build-qemu.sh | tail -n1)
cargo build --release -p qemu-accel --bin fragvisor >&2
fv=$FV_ROOT/target/release/fragvisor
image=$(guest-kernel/build-system-image.sh | tail -n1)

work=$(mktemp -d /tmp/fv-bench-io.XXXXXX)
launcher_pid=
cleanup() {
    [ -n "$launcher_pid" ] && kill -INT "$launcher_pid" 2>/dev/null && wait "$launcher_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
for f in vmlinuz initrd.cpio.gz cmdline id_ed25519 known_hosts; do
    cp "$(dirname "$image")/$f" "$work/"
done
chmod 600 "$work/id_ed25519"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -g | awk '{a[NR]=$1} END {if (NR) print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# start_vm NODES NAME [extra run args]: boots, waits for ssh; the seconds
# it took go to $work/ready.
start_vm() {
    local nodes=$1 name=$2
    shift 2
    cp --sparse=always "$image" "$work/debian.img"
    local t0
    t0=$(date +%s.%N)
    "$fv" run --engine fragvisor-tcg --nodes "$nodes" --smp 4 --memory 1G --qemu "$qemu" \
        --disk "$work/debian.img" --name "$name" --stop-timeout 30 "$@" \
        > "$work/console.$name" 2> "$work/log.$name" &
    launcher_pid=$!
    "$fv" ssh "$name" --wait 1800 -- true || fv_die "VM $name: no ssh (log: $(tail -n 5 "$work/log.$name"))"
    echo "$(date +%s.%N) - $t0" | bc > "$work/ready"
}
stop_vm() {
    local name=$1
    "$fv" ssh "$name" -- systemctl poweroff >/dev/null 2>&1 || true
    wait "$launcher_pid" || fv_log "VM $name exited $?"
    launcher_pid=
}
g() { "$fv" ssh bench -- "$@"; }

json=$work/result.json
echo '{}' > "$json"
put() { # put KEY VALUE
    python3 - "$json" "$1" "$2" <<'EOF'
import json, sys
p, k, v = sys.argv[1:]
d = json.load(open(p))
try:
    d[k] = float(v)
except ValueError:
    d[k] = v
json.dump(d, open(p, "w"))
EOF
}

truncate -s 1G "$work/scratch.img"
ssh_port=$(free_port)
http_port=$(free_port)
fv_log "booting 2 nodes for ab and fio"
start_vm 2 bench --disk "$work/scratch.img" \
    --net "user,hostfwd=tcp:127.0.0.1:$ssh_port-:22,hostfwd=tcp:127.0.0.1:$http_port-:80"
fv_log "ssh-ready after $(cat "$work/ready") s"
g 'for s in 1k:1024 64k:65536 1m:1048576; do head -c ${s#*:} /dev/urandom > /var/www/html/f${s%%:*}; done; sync'
nic_irq=$(g 'grep "$(basename $(readlink /sys/class/net/eth0/device))-input.0" /proc/interrupts | cut -d: -f1' | tr -d ' ')
[ -n "$nic_irq" ] || fv_die "cannot find the virtio-net receive IRQ"

for place in origin:1 remote:2; do
    where=${place%%:*} cpu=${place#*:}
    bits=""
    for i in 3 2 1 0; do if [ "$i" = "$cpu" ]; then bits+=1; else bits+=0; fi; done
    fv_log "$where: nginx worker and NIC IRQ $nic_irq on CPU $cpu"
    g "sed -i -e '/^worker_cpu_affinity/d' \
         -e 's/^worker_processes.*/worker_processes 1;\nworker_cpu_affinity $bits;/' \
         /etc/nginx/nginx.conf && systemctl restart nginx && echo $cpu > /proc/irq/$nic_irq/smp_affinity_list"
    got=$(g "taskset -cp \$(ps -C nginx -o pid=,args= | awk '/worker process/ {print \$1}') | sed 's/.*: //'")
    [ "$got" = "$cpu" ] || fv_die "nginx worker on CPU '$got', wanted $cpu"
    for size in 1k 64k 1m; do
        case $size in 1k) n=200 ;; 64k) n=100 ;; 1m) n=20 ;; esac
        : > "$work/rps" ; : > "$work/p50"
        for _ in $(seq "$runs"); do
            ab -q -n "$n" -c 4 "http://127.0.0.1:$http_port/f$size" > "$work/ab.out" 2>&1 \
                || fv_die "ab failed: $(tail -n 3 "$work/ab.out")"
            awk '/^Requests per second:/ {print $4}' "$work/ab.out" >> "$work/rps"
            awk '$1 == "50%" {print $2}' "$work/ab.out" >> "$work/p50"
        done
        put "ab_${size}_rps_$where" "$(median < "$work/rps")"
        put "ab_${size}_p50_ms_$where" "$(median < "$work/p50")"
        fv_log "$where ab $size: $(median < "$work/rps") req/s, p50 $(median < "$work/p50") ms"
    done
    for t in randread:4k randwrite:4k read:1m write:1m; do
        rw=${t%%:*} bs=${t#*:}
        : > "$work/fio"
        for _ in $(seq "$runs"); do
            g "taskset -c $cpu fio --name=b --filename=/dev/vdb --direct=1 --ioengine=libaio --iodepth=4 \
               --rw=$rw --bs=$bs --runtime=$fio_s --time_based --output-format=json" > "$work/fio.json" \
                || fv_die "fio $rw failed"
            python3 - "$work/fio.json" "$rw" "$bs" >> "$work/fio" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["read"] if "read" in sys.argv[2] else j["write"]
print(side["iops"] if sys.argv[3] == "4k" else side["bw_bytes"] / 1e6)
EOF
        done
        case $rw in
            randread) key=fio_randread_iops ;; randwrite) key=fio_randwrite_iops ;;
            read) key=fio_seqread_mbps ;; write) key=fio_seqwrite_mbps ;;
        esac
        put "${key}_$where" "$(median < "$work/fio")"
        fv_log "$where fio $rw $bs: $(median < "$work/fio")"
    done
done
stop_vm bench

if [ -n "$do_boot" ]; then
    for nodes in 1 2 4; do
        : > "$work/boot"
        for _ in $(seq "$boot_runs"); do
            fv_log "boot to ssh-ready, $nodes node(s)"
            start_vm "$nodes" bench
            cat "$work/ready" >> "$work/boot"
            stop_vm bench
        done
        put "boot_ssh_ready_s_${nodes}node" "$(median < "$work/boot")"
        fv_log "$nodes node(s): ssh-ready after $(median < "$work/boot") s"
    done
fi

python3 - "$json" "$runs" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
d["runs"] = int(sys.argv[2])
for k in sorted(d):
    if k.endswith("_origin"):
        base = k[: -len("_origin")]
        o, r = d[k], d.get(base + "_remote")
        if r is None or not o or not r:
            continue
        d[base + "_remote_vs_origin"] = round(o / r if "_p50_" in base else r / o, 3)
if "boot_ssh_ready_s_1node" in d:
    for n in (2, 4):
        k = f"boot_ssh_ready_s_{n}node"
        if k in d:
            d[f"boot_{n}node_vs_1node"] = round(d[k] / d["boot_ssh_ready_s_1node"], 2)
print(json.dumps(d, sort_keys=True))
EOF
