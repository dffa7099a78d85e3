#!/bin/sh
# The pipeline and run commands end to end through the real CLI on a stack
# started by `genpipe dev up` (orchestrator and noop service included):
# submit (new and unchanged versions), runs watch exit codes, runs show/list
# --json, cancel, retry, pipelines list/show/diff, --param checks.
set -eu
GENPIPE=${1:?usage: cli_runs.sh path/to/genpipe SRC_DIR}
SRC=${2:?usage: cli_runs.sh path/to/genpipe SRC_DIR}
fail() { echo "cli_runs.sh: FAIL: $*" >&2; exit 1; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/genpipe-cli-XXXXXX")
chmod 0711 "$dir"
export GENPIPE_DATA_DIR="$dir/data"
trap '"$GENPIPE" dev down >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
"$GENPIPE" dev up > "$dir/up.txt" 2>&1 || { cat "$dir/up.txt"; fail "dev up"; }
grep -q "genpipe-noop started" "$dir/up.txt" || fail "noop service not started"

# A diamond: succeeds, and the watch says so with exit 0.
out=$("$GENPIPE" submit "$SRC/pipelines/diamond.yaml" --param work=50ms --json)
echo "$out" | grep -q '"created":	true' || fail "first submit did not create a version: $out"
run=$(echo "$out" | sed -n 's/.*"run":[^0-9]*\([0-9]*\).*/\1/p')
[ -n "$run" ] || fail "no run id in: $out"
"$GENPIPE" runs watch "$run" --timeout-ms 60000 > "$dir/watch.txt" || { cat "$dir/watch.txt"; fail "watch of a good run exited non-zero"; }
grep -q "run $run succeeded" "$dir/watch.txt" || fail "watch did not report success"
"$GENPIPE" runs show "$run" --json > "$dir/show1.json"
grep -q '"state":	"succeeded"' "$dir/show1.json" || fail "runs show --json"
grep -A4 '"stage":	"right"' "$dir/show1.json" | grep -q '"attempts":	2' || fail "right was not retried once"

# Same content again: same version.
"$GENPIPE" submit "$SRC/pipelines/diamond.yaml" --no-run | grep -q "version 1 (unchanged" || fail "resubmit made a new version"
# Bad params are refused before anything is stored.
if "$GENPIPE" submit "$SRC/pipelines/diamond.yaml" --param nope=1 2> "$dir/err.txt"; then fail "unknown param accepted"; fi
grep -q 'the pipeline has no param "nope"' "$dir/err.txt" || fail "unknown param message: $(cat "$dir/err.txt")"

# A failing pipeline: watch exits 1; retry resumes only the failed part.
cat > "$dir/flaky.yaml" <<'YAML'
apiVersion: genpipe/v1
kind: Pipeline
metadata: {name: flaky}
spec:
  stages:
    - {name: ok, kind: noop, cache: false}
    - {name: bad, kind: noop, needs: ok, cache: false, retry: {limit: 0}, with: {fail_attempts: 1}}
    - {name: after, kind: noop, needs: bad, cache: false}
YAML
run=$("$GENPIPE" submit "$dir/flaky.yaml" --json | sed -n 's/.*"run":[^0-9]*\([0-9]*\).*/\1/p')
if "$GENPIPE" runs watch "$run" --timeout-ms 60000 > "$dir/watch2.txt"; then fail "watch of a failing run exited 0"; fi
grep -q "run $run failed" "$dir/watch2.txt" || fail "watch did not report failure"
"$GENPIPE" runs show "$run" | grep -q "^after .*skipped" || fail "downstream not skipped"
"$GENPIPE" runs retry "$run" | grep -q "resumed" || fail "retry"
"$GENPIPE" runs watch "$run" --timeout-ms 60000 > /dev/null || fail "resumed run did not succeed"
"$GENPIPE" runs show "$run" --json > "$dir/show.json"
# ok ran once (kept), bad twice (attempt 2 after resume)
grep -A4 '"stage":	"ok"' "$dir/show.json" | grep -q '"attempts":	1' || fail "ok ran again on resume"
grep -A4 '"stage":	"bad"' "$dir/show.json" | grep -q '"attempts":	2' || fail "bad did not get a second attempt"

# Cancel a long run.
cat > "$dir/long.yaml" <<'YAML'
apiVersion: genpipe/v1
kind: Pipeline
metadata: {name: long}
spec:
  stages: [{name: wait, kind: noop, cache: false, with: {duration: 60s}}]
YAML
run=$("$GENPIPE" submit "$dir/long.yaml" --json | sed -n 's/.*"run":[^0-9]*\([0-9]*\).*/\1/p')
sleep 1
"$GENPIPE" runs cancel "$run" | grep -q "cancelled" || fail "cancel"
if "$GENPIPE" runs watch "$run" --timeout-ms 10000 > "$dir/watch3.txt"; then fail "watch of a cancelled run exited 0"; fi
grep -q "run $run cancelled" "$dir/watch3.txt" || fail "watch did not report cancel"
if "$GENPIPE" runs cancel "$run" 2>/dev/null; then fail "second cancel accepted"; fi

# Versions: a changed spec is version 2; diff shows the change.
sed 's/60s/1s/' "$dir/long.yaml" > "$dir/long2.yaml"
"$GENPIPE" submit "$dir/long2.yaml" --no-run | grep -q "version 2 (new" || fail "changed spec not version 2"
"$GENPIPE" pipelines list | grep -q "^long .* 2 .* 2 " || fail "pipelines list: $("$GENPIPE" pipelines list)"
"$GENPIPE" pipelines show long@1 | grep -q "duration: 60s" || fail "pipelines show keeps the text"
set +e
"$GENPIPE" pipelines diff long@1 long@2 > "$dir/diff.txt"; rc=$?
set -e
[ $rc = 1 ] || fail "diff of different versions exited $rc"
grep -q '^-.*"60s"' "$dir/diff.txt" && grep -q '^+.*"1s"' "$dir/diff.txt" || fail "diff: $(cat "$dir/diff.txt")"
"$GENPIPE" pipelines diff long@2 long@2 | grep -q "same content" || fail "diff of equal versions"
if "$GENPIPE" pipelines show long@9 2>/dev/null; then fail "missing version shown"; fi
"$GENPIPE" runs list --pipeline flaky --json | grep -q '"state":	"succeeded"' || fail "runs list --pipeline"
"$GENPIPE" pipelines diff long@1 long@2 --json | grep -q '"same":	false' || fail "diff --json"
run=$("$GENPIPE" submit "$SRC/pipelines/diamond.yaml" --param work=20ms --json | sed -n 's/.*"run":[^0-9]*\([0-9]*\).*/\1/p')
"$GENPIPE" runs watch "$run" --json --timeout-ms 60000 > "$dir/watch.jsonl" || fail "watch --json"
tail -1 "$dir/watch.jsonl" | grep -q '"state":"succeeded","final":true' || fail "watch --json end: $(tail -1 "$dir/watch.jsonl")"
grep -qE '"stage":"join","state":"(succeeded|cached)"' "$dir/watch.jsonl" || fail "watch --json stages"
"$GENPIPE" dev down > /dev/null
if grep -l -E 'ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:' "$GENPIPE_DATA_DIR"/logs/genpipe-*.log; then
	fail "sanitizer report in a service log"
fi
echo "cli_runs.sh: passed"
