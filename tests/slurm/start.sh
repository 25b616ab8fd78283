#!/usr/bin/env bash
# Start a one-node SLURM on localhost (munged, slurmctld, slurmd) with NGPU fake GPUs; about a second.
#   SLURM_CI_DIR=/tmp/slurm SLURM_CI_NGPU=2 bash tests/slurm/start.sh     # stop.sh stops it by pid files
# The config goes to /etc/slurm, where srun inside a job looks (a job's environment does not keep SLURM_CONF);
# whatever was there is saved first and stop.sh puts it back.
set -euo pipefail
DIR=${SLURM_CI_DIR:?set SLURM_CI_DIR}; NGPU=${SLURM_CI_NGPU:-2}
HOST=$(hostname -s); CPUS=$(nproc)
MEM=$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') - 1024 ))   # 1 GiB headroom
rm -rf "$DIR"/{state,spool,run,log}   # a drained node would survive a restart through its saved state
mkdir -p "$DIR"/{state,spool,run,log,dev}
# slurm 22.05 drops GPUs without a File=, and File= must be a character device
for i in $(seq 0 $((NGPU - 1))); do [ -e "$DIR/dev/gpu$i" ] || mknod "$DIR/dev/gpu$i" c 1 3; done
mkdir -p /etc/slurm "$DIR/etc-saved"
for f in slurm.conf gres.conf; do [ -e "/etc/slurm/$f" ] && cp -p "/etc/slurm/$f" "$DIR/etc-saved/$f"; done
touch "$DIR/etc-saved/.complete"   # stop.sh restores /etc/slurm only once the originals are saved
sed -e "s#@DIR@#$DIR#g" -e "s#@HOST@#$HOST#g" -e "s#@CPUS@#$CPUS#g" -e "s#@MEM@#$MEM#g" -e "s#@NGPU@#$NGPU#g" \
    "$(dirname "$0")/slurm.conf.in" > /etc/slurm/slurm.conf
echo "NodeName=$HOST Name=gpu Type=fake File=$DIR/dev/gpu[0-$((NGPU - 1))]" > /etc/slurm/gres.conf
# munge: reuse a munged that already answers on the default socket (it is not ours to stop); else start one,
# as user munge, with its pid file beside the others
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  install -d -o munge -g munge -m 0755 /run/munge
  [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
  runuser -u munge -- /usr/sbin/munged --force --pid-file=/run/munge/munged.pid
  for i in $(seq 50); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.1; done
  cp /run/munge/munged.pid "$DIR/run/munged.pid"   # ours: stop.sh stops it
fi
/usr/sbin/slurmctld
/usr/sbin/slurmd
for i in $(seq 100); do sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && exit 0; sleep 0.2; done
echo "slurm did not come up: see $DIR/log" >&2
exit 1
