#!/usr/bin/env bash
# Starts the local servers the integration tests use (PostgreSQL, NATS JetStream) when they are
# not already answering. The machine image starts them at boot; CI may find them stopped.
set -uo pipefail
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_up() { for _ in $(seq 1 50); do up "$1" && return 0; sleep 0.2; done; return 1; }

if ! up 5432; then
  echo "services: starting PostgreSQL" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  wait_up 5432 || echo "services: PostgreSQL did not come up; postgres tests will be skipped" >&2
fi
if ! up 4222 && [ -x /usr/sbin/nats-server ]; then
  echo "services: starting NATS JetStream" >&2
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
  wait_up 4222 || echo "services: NATS did not come up" >&2
fi
if ! up 6379 && command -v redis-server >/dev/null; then
  echo "services: starting Redis" >&2
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  wait_up 6379 || echo "services: Redis did not come up; shared rate-limit tests will be skipped" >&2
fi
exit 0
