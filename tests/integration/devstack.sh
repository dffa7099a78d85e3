#!/bin/sh
# `genpipe dev up / status / down / up again` through the real CLI, as the
# current user and, when that is root, also as an ordinary user (nobody).
# Data survives down/up; `up` on a running stack starts nothing new.
set -eu
BUILT=${1:?usage: devstack.sh path/to/genpipe MIGRATIONS_DIR}
MIGRATIONS=${2:?usage: devstack.sh path/to/genpipe MIGRATIONS_DIR}
fail() { echo "devstack.sh: FAIL: $*" >&2; exit 1; }

run_as() { # user, then command
	u=$1; shift
	if [ "$u" = "$(id -un)" ]; then "$@"; else setpriv --reuid="$u" --regid="$(id -g "$u")" --clear-groups --reset-env env GENPIPE_MIGRATIONS_DIR="$GENPIPE_MIGRATIONS_DIR" "$@"; fi
}

scenario() {
	user=$1
	dir=$(mktemp -d "${TMPDIR:-/tmp}/genpipe-dev-XXXXXX")
	chmod 0711 "$dir"
	[ "$user" = "$(id -un)" ] || chown "$user" "$dir"
	data="$dir/data"
	# Binaries and migrations copied where any user can read them: the
	# checkout may live under a directory the unprivileged user cannot enter.
	mkdir -p "$dir/bin"
	cp "$BUILT" "$(dirname "$BUILT")"/genpipe-* "$dir/bin/"
	cp -r "$MIGRATIONS" "$dir/migrations"
	chmod -R a+rX "$dir/bin" "$dir/migrations"
	GENPIPE="$dir/bin/genpipe"
	export GENPIPE_MIGRATIONS_DIR="$dir/migrations"
	trap 'run_as "$user" "$GENPIPE" dev down --data-dir "$data" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT

	run_as "$user" "$GENPIPE" dev up --data-dir "$data" > "$dir/up1.txt" 2>&1 || { cat "$dir/up1.txt"; fail "dev up as $user"; }
	grep -q "nats-server started" "$dir/up1.txt" || fail "no nats start"
	grep -q "postgres started" "$dir/up1.txt" || fail "no postgres start"
	run_as "$user" "$GENPIPE" dev status --data-dir "$data" > "$dir/st1.txt" || { cat "$dir/st1.txt"; fail "status not healthy as $user"; }
	cat "$dir/st1.txt"
	grep -q "^nats .*healthy .*jetstream enabled" "$dir/st1.txt" || fail "jetstream not reported on"
	grep -q "^postgres .*healthy .*0 pending" "$dir/st1.txt" || fail "migrations not reported applied"
	grep -q "^orchestrator .*healthy" "$dir/st1.txt" || fail "orchestrator not healthy"
	if [ "$(id -u)" = 0 ] && [ "$user" = root ]; then
		pgpid=$(cat "$data/run/postgres.pid")
		[ "$(stat -c %U /proc/$pgpid)" != root ] || fail "postgres runs as root"
	fi
	envfile="$data/env"
	[ "$(stat -c %a "$envfile")" = 600 ] || fail "env file is not private"
	dburl=$(sed -n 's/^GENPIPE_DATABASE_URL=//p' "$envfile")
	run_as "$user" psql -q "$dburl" -c "INSERT INTO audit_log (actor, action, object) VALUES ('devstack', 'test', 'kept')" || fail "psql insert"

	run_as "$user" "$GENPIPE" migrate --database-url "$dburl" | grep -q "0 applied now" || fail "migrate on an up-to-date database"
	if run_as "$user" "$GENPIPE" migrate --connect-timeout-ms 500 --database-url "postgresql://x@127.0.0.1:1/none?connect_timeout=1" >/dev/null 2>&1; then fail "migrate against nothing succeeded"; fi
	if run_as "$user" "$GENPIPE" dev bogus --data-dir "$data" 2>/dev/null; then fail "unknown command accepted"; fi

	# up on a running stack: nothing restarted
	pids1=$(cat "$data"/run/*.pid | sort | tr '\n' ' ')
	run_as "$user" "$GENPIPE" dev up --data-dir "$data" > "$dir/up2.txt" 2>&1 || fail "second up"
	grep -q "already running" "$dir/up2.txt" || fail "second up restarted things"
	pids2=$(cat "$data"/run/*.pid | sort | tr '\n' ' ')
	[ "$pids1" = "$pids2" ] || fail "pids changed on second up: $pids1 vs $pids2"

	run_as "$user" "$GENPIPE" dev logs orchestrator --data-dir "$data" --lines 5 | grep -q '"svc":"orchestrator"' || fail "dev logs"

	run_as "$user" "$GENPIPE" dev down --data-dir "$data" || fail "down"
	for p in $pids1; do
		if kill -0 "$p" 2>/dev/null && ! grep -q zombie /proc/$p/status 2>/dev/null; then
			[ "$(cut -d' ' -f3 /proc/$p/stat)" = Z ] || fail "pid $p still running after down"
		fi
	done
	if run_as "$user" "$GENPIPE" dev status --data-dir "$data" > "$dir/st2.txt"; then fail "status healthy after down"; fi
	grep -q "stopped" "$dir/st2.txt" || fail "status does not say stopped"

	run_as "$user" "$GENPIPE" dev up --data-dir "$data" > "$dir/up3.txt" 2>&1 || { cat "$dir/up3.txt"; fail "up after down"; }
	grep -q "initdb" "$dir/up3.txt" && fail "up after down ran initdb again"
	dburl=$(sed -n 's/^GENPIPE_DATABASE_URL=//p' "$envfile")
	n=$(run_as "$user" psql -tA "$dburl" -c "SELECT count(*) FROM audit_log WHERE object = 'kept'")
	[ "$n" = 1 ] || fail "data not kept across down/up (got $n)"
	run_as "$user" "$GENPIPE" dev down --data-dir "$data" >/dev/null || fail "final down"
	if grep -l -E 'ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:' "$data"/logs/genpipe-*.log; then
		fail "sanitizer report in a service log"
	fi
	trap - EXIT
	rm -rf "$dir"
	echo "devstack.sh: $user ok"
}

scenario "$(id -un)"
if [ "$(id -u)" = 0 ]; then
	scenario nobody
fi
echo "devstack.sh: passed"
