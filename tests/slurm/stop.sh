#!/usr/bin/env bash
# Stop what start.sh started, each daemon by its pid file (never by name): SIGTERM, then SIGKILL after 10 s.
DIR=${SLURM_CI_DIR:?set SLURM_CI_DIR}
for pidfile in "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" "$DIR/run/munged.pid"; do
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile"); kill "$pid" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$pidfile"
done
# /etc/slurm as start.sh found it: its files back, or none where there were none
if [ -e "$DIR/etc-saved/.complete" ]; then
  for f in slurm.conf gres.conf; do
    if [ -e "$DIR/etc-saved/$f" ]; then cp -p "$DIR/etc-saved/$f" "/etc/slurm/$f"; else rm -f "/etc/slurm/$f"; fi
  done
  rm -f "$DIR/etc-saved/.complete"
fi
exit 0
