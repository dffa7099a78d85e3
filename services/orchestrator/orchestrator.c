/*
 * orchestrator.c: the control loop (see orchestrator.h).
 *
 * One connection LISTENs on two channels: 'genpipe_outbox' (an outbox row
 * committed: relay now) and 'genpipe_runs' (payload: a run whose state may
 * have moved: advance it). Notifications are hints; a sweep of unfinished
 * runs every sweep_ms and per-run due times (backoffs, timeouts) make sure
 * nothing waits on a lost one. Pending runs are coalesced, so a burst of
 * results for one run costs one advance.
 */
#include "orchestrator.h"

#include <poll.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "log.h"
#include "outbox.h"
#include "worker.h"

struct due {
	long long run_id;
	long long at_ms; /* monotonic */
};

struct gp_orchestrator {
	struct gp_orchestrator_config cfg;
	struct gp_db *db;
	struct gp_bus *bus;
	long long next_reap_ms, next_sweep_ms;
	int db_broken;
	int relay_needed;
	long long *pending;
	int npending, cappending;
	struct due *dues;
	int ndues, capdues;
	struct due *costs; /* run -> earliest next advance (its last advance's cost later) */
	int ncosts, capcosts;
	struct gp_outbox_direct direct; /* an advance's job messages, published after its commit */
	struct gp_metric *m_redispatched, *m_direct, *m_relay_passes, *m_relayed, *m_dups, *m_reaped, *m_errors, *m_advances, *m_dispatched,
		*m_reads_all, *m_reads_active,
		*m_advance_seconds;
	long long reads_all, reads_active; /* the engine's counts at the last advance */
};

static void add_pending(struct gp_orchestrator *o, long long run_id)
{
	for (int i = 0; i < o->npending; i++)
		if (o->pending[i] == run_id)
			return;
	if (o->npending == o->cappending) {
		int nc = o->cappending ? o->cappending * 2 : 64;
		long long *np = realloc(o->pending, sizeof *np * (size_t)nc);
		if (!np)
			return; /* the sweep will find it */
		o->pending = np;
		o->cappending = nc;
	}
	o->pending[o->npending++] = run_id;
}

static void set_due(struct gp_orchestrator *o, long long run_id, long long in_ms)
{
	for (int i = 0; i < o->ndues; i++) {
		if (o->dues[i].run_id == run_id) {
			if (in_ms < 0)
				o->dues[i] = o->dues[--o->ndues];
			else
				o->dues[i].at_ms = gp_now_ms() + in_ms;
			return;
		}
	}
	if (in_ms < 0)
		return;
	if (o->ndues == o->capdues) {
		int nc = o->capdues ? o->capdues * 2 : 64;
		struct due *nd = realloc(o->dues, sizeof *nd * (size_t)nc);
		if (!nd)
			return;
		o->dues = nd;
		o->capdues = nc;
	}
	o->dues[o->ndues].run_id = run_id;
	o->dues[o->ndues].at_ms = gp_now_ms() + in_ms;
	o->ndues++;
}

/*
 * Pace a big run: the next advance of a run waits at least as long as its
 * last one took, so that one run cannot hold the orchestrator in a loop of
 * back-to-back advances while results trickle in; they coalesce instead.
 */
static long long paced_until(struct gp_orchestrator *o, long long run_id)
{
	for (int i = 0; i < o->ncosts; i++)
		if (o->costs[i].run_id == run_id)
			return o->costs[i].at_ms;
	return 0;
}

static void set_pace(struct gp_orchestrator *o, long long run_id, long long until)
{
	for (int i = 0; i < o->ncosts; i++) {
		if (o->costs[i].run_id == run_id) {
			o->costs[i].at_ms = until;
			return;
		}
	}
	if (o->ncosts == o->capcosts) {
		/* forget paces that have passed before growing */
		long long now = gp_now_ms();
		for (int i = 0; i < o->ncosts;)
			if (o->costs[i].at_ms <= now)
				o->costs[i] = o->costs[--o->ncosts];
			else
				i++;
	}
	if (o->ncosts == o->capcosts) {
		int nc = o->capcosts ? o->capcosts * 2 : 64;
		struct due *nd = realloc(o->costs, sizeof *nd * (size_t)nc);
		if (!nd)
			return;
		o->costs = nd;
		o->capcosts = nc;
	}
	o->costs[o->ncosts].run_id = run_id;
	o->costs[o->ncosts].at_ms = until;
	o->ncosts++;
}

static gp_status listen_all(struct gp_db *db, struct gp_err *err)
{
	gp_status st = gp_outbox_listen(db, err);
	if (!st)
		st = gp_db_run(db, "listen for runs", "LISTEN genpipe_runs", err);
	return st;
}

gp_status gp_orchestrator_create(struct gp_orchestrator **out,
				 const struct gp_orchestrator_config *cfg, struct gp_db *db,
				 struct gp_bus *bus, struct gp_metrics *metrics,
				 struct gp_err *err)
{
	struct gp_orchestrator *o = calloc(1, sizeof *o);
	if (!o)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	o->cfg = *cfg;
	if (o->cfg.reap_interval_ms <= 0)
		o->cfg.reap_interval_ms = 1000;
	if (o->cfg.relay_wait_ms <= 0)
		o->cfg.relay_wait_ms = 500;
	if (o->cfg.relay_batch <= 0)
		o->cfg.relay_batch = 100;
	if (o->cfg.sweep_ms <= 0)
		o->cfg.sweep_ms = 1000;
	if (o->cfg.redispatch_ms <= 0)
		o->cfg.redispatch_ms = 600000;
	o->db = db;
	o->bus = bus;
	o->relay_needed = 1;
	if (metrics) {
		o->m_relayed = gp_metrics_get(metrics, GP_COUNTER, "genpipe_outbox_relayed_total",
					      "Outbox messages published and marked sent", NULL,
					      NULL, 0);
		o->m_redispatched = gp_metrics_get(metrics, GP_COUNTER,
						   "genpipe_attempts_redispatched_total",
						   "Job messages published again for attempts still "
						   "queued after --redispatch-ms",
						   NULL, NULL, 0);
		o->m_direct = gp_metrics_get(metrics, GP_COUNTER,
					     "genpipe_outbox_direct_total",
					     "Job messages an advance published itself right after "
					     "its commit (the rest go through the relay)",
					     NULL, NULL, 0);
		o->m_relay_passes = gp_metrics_get(metrics, GP_COUNTER,
						   "genpipe_outbox_relay_passes_total",
						   "Relay transactions (each publishes a batch)", NULL,
						   NULL, 0);
		o->m_dups = gp_metrics_get(metrics, GP_COUNTER,
					   "genpipe_outbox_duplicates_total",
					   "Outbox re-publishes JetStream reported as duplicates",
					   NULL, NULL, 0);
		o->m_reaped = gp_metrics_get(metrics, GP_COUNTER, "genpipe_leases_reaped_total",
					     "Attempts whose lease expired", NULL, NULL, 0);
		o->m_errors = gp_metrics_get(metrics, GP_COUNTER,
					     "genpipe_orchestrator_errors_total",
					     "Failed relay, reap or advance passes", NULL, NULL, 0);
		o->m_advances = gp_metrics_get(metrics, GP_COUNTER, "genpipe_run_advances_total",
					       "Run advances (one transaction each)", NULL, NULL, 0);
		o->m_reads_all = gp_metrics_get(metrics, GP_COUNTER, "genpipe_run_stage_reads_total",
						"Advances by how they read the run's stage rows: all "
						"of them, or only the active ones (kept rows current)",
						"read=\"all\"", NULL, 0);
		o->m_reads_active = gp_metrics_get(metrics, GP_COUNTER,
						   "genpipe_run_stage_reads_total",
						   "Advances by how they read the run's stage rows: "
						   "all of them, or only the active ones (kept rows "
						   "current)",
						   "read=\"active\"", NULL, 0);
		o->m_dispatched = gp_metrics_get(metrics, GP_COUNTER,
						 "genpipe_attempts_dispatched_total",
						 "Stage attempts written with their job message",
						 NULL, NULL, 0);
		static const double b[] = { 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1 };
		o->m_advance_seconds = gp_metrics_get(metrics, GP_HISTOGRAM,
						      "genpipe_run_advance_seconds",
						      "Time to advance one run", NULL, b, 9);
	}
	gp_status st = listen_all(db, err);
	if (st) {
		free(o);
		return st;
	}
	*out = o;
	return GP_OK;
}

void gp_orchestrator_destroy(struct gp_orchestrator *o)
{
	if (!o)
		return;
	gp_outbox_direct_free(&o->direct);
	free(o->pending);
	free(o->dues);
	free(o->costs);
	free(o);
}

/* Collect notifications already received; wait up to timeout_ms for more. */
static void wait_notifications(struct gp_orchestrator *o, long long timeout_ms)
{
	PGconn *c = gp_db_conn(o->db);
	int got = 0;
	for (int round = 0; round < 2; round++) {
		PQconsumeInput(c);
		PGnotify *nt;
		while ((nt = PQnotifies(c)) != NULL) {
			got = 1;
			if (!strcmp(nt->relname, "genpipe_runs")) {
				long long id = atoll(nt->extra);
				if (id > 0)
					add_pending(o, id);
			} else if (nt->be_pid != PQbackendPID(c)) {
				/* Rows this connection wrote (an advance's job messages, a
				 * reap's) are relayed in the step that wrote them; waking
				 * for our own notification would be a pass for nothing. */
				o->relay_needed = 1;
			}
			PQfreemem(nt);
		}
		if (got || round == 1 || timeout_ms <= 0)
			return;
		struct pollfd pfd = { .fd = PQsocket(c), .events = POLLIN };
		if (pfd.fd < 0 || poll(&pfd, 1, (int)timeout_ms) <= 0)
			return;
	}
}

static void relay(struct gp_orchestrator *o)
{
	struct gp_err err = { 0 };
	int published = 0, dups = 0;
	gp_status st;
	o->relay_needed = 0;
	do {
		st = gp_outbox_relay_once(o->db, o->bus, o->cfg.relay_batch, NULL, &published,
					  &dups, &err);
		gp_metric_inc(o->m_relay_passes, 1);
		gp_metric_inc(o->m_relayed, published);
		gp_metric_inc(o->m_dups, dups);
	} while (!st && published == o->cfg.relay_batch);
	if (st) {
		gp_metric_inc(o->m_errors, 1);
		gp_warn("outbox relay: %s", err.msg);
		o->relay_needed = 1; /* try again next turn */
		if (st == GP_ERR_UNAVAILABLE && !gp_db_ok(o->db))
			o->db_broken = 1;
	}
}

static void sweep(struct gp_orchestrator *o)
{
	PGresult *r = NULL;
	struct gp_err err = { 0 };
	if (gp_db_exec(o->db, "sweep runs",
		       "SELECT id FROM runs WHERE state IN ('queued', 'running') ORDER BY id", 0,
		       NULL, &r, &err)) {
		gp_metric_inc(o->m_errors, 1);
		gp_warn("sweep: %s", err.msg);
		if (!gp_db_ok(o->db))
			o->db_broken = 1;
		return;
	}
	for (int i = 0; i < PQntuples(r); i++)
		add_pending(o, atoll(PQgetvalue(r, i, 0)));
	PQclear(r);
}

void gp_orchestrator_step(struct gp_orchestrator *o)
{
	struct gp_err err = { 0 };
	if (o->db_broken) {
		if (!gp_db_ok(o->db) || listen_all(o->db, &err)) {
			gp_sleep_ms(500);
			return;
		}
		o->db_broken = 0;
		o->relay_needed = 1;
		o->next_sweep_ms = 0;
		gp_info("database connection restored");
	}
	long long now = gp_now_ms();
	if (now >= o->next_sweep_ms) {
		sweep(o);
		/* Rows another relay held when it died were skipped (SKIP LOCKED) and
		 * will not be notified again: look at the outbox on every sweep. */
		o->relay_needed = 1;
		o->next_sweep_ms = now + o->cfg.sweep_ms;
	}
	for (int i = 0; i < o->ndues;) {
		if (o->dues[i].at_ms <= now) {
			add_pending(o, o->dues[i].run_id);
			o->dues[i] = o->dues[--o->ndues];
		} else {
			i++;
		}
	}
	if (now >= o->next_reap_ms) {
		int reaped = 0;
		if (gp_lease_reap(o->db, 100, &reaped, &err)) {
			gp_metric_inc(o->m_errors, 1);
			gp_warn("lease reaper: %s", err.msg);
		}
		gp_metric_inc(o->m_reaped, reaped);
		int again = 0;
		if (gp_attempts_redispatch(o->db, o->cfg.redispatch_ms, 100, &again, &err)) {
			gp_metric_inc(o->m_errors, 1);
			gp_warn("re-dispatch: %s", err.msg);
		}
		gp_metric_inc(o->m_redispatched, again);
		if (reaped || again)
			o->relay_needed = 1;
		o->next_reap_ms = now + o->cfg.reap_interval_ms;
	}
	/* Advance what is pending; results arriving meanwhile queue up again. */
	long long *runs = o->pending;
	int nruns = o->npending;
	o->pending = NULL;
	o->npending = o->cappending = 0;
	for (int i = 0; i < nruns && !o->db_broken; i++) {
		long long due = -1, t0 = gp_now_ms();
		long long pace = paced_until(o, runs[i]);
		if (pace > t0) {
			set_due(o, runs[i], pace - t0);
			continue;
		}
		int dispatched = 0;
		gp_status st = gp_engine_advance(o->db, runs[i], &due, &dispatched, &o->direct, &err);
		gp_metric_inc(o->m_advances, 1);
		long long ra = 0, rx = 0;
		gp_engine_stage_reads(&ra, &rx);
		gp_metric_inc(o->m_reads_all, (double)(ra - o->reads_all));
		gp_metric_inc(o->m_reads_active, (double)(rx - o->reads_active));
		o->reads_all = ra;
		o->reads_active = rx;
		gp_metric_observe(o->m_advance_seconds, (double)(gp_now_ms() - t0) / 1000.0);
		if (st) {
			gp_metric_inc(o->m_errors, 1);
			gp_warn("advance run %lld: %s", runs[i], err.msg);
			if (st == GP_ERR_UNAVAILABLE && !gp_db_ok(o->db))
				o->db_broken = 1;
			set_due(o, runs[i], 1000);
			continue;
		}
		long long t1 = gp_now_ms();
		if (t1 - t0 >= 2)
			set_pace(o, runs[i], t1 + (t1 - t0));
		gp_metric_inc(o->m_dispatched, dispatched);
		if (o->direct.n) {
			/* at once, not after the other runs' advances: this is the
			 * stages' dispatch latency */
			int n = o->direct.n, dups = 0;
			if (gp_outbox_publish_direct(o->db, o->bus, &o->direct, &dups, &err)) {
				gp_metric_inc(o->m_errors, 1);
				gp_warn("publish job messages of run %lld: %s (the relay will)",
					runs[i], err.msg);
				o->relay_needed = 1;
				if (!gp_db_ok(o->db))
					o->db_broken = 1;
			} else {
				gp_metric_inc(o->m_direct, n);
				gp_metric_inc(o->m_dups, dups);
			}
		} else if (dispatched) {
			o->relay_needed = 1;
		}
		set_due(o, runs[i], due);
	}
	free(runs);
	if (o->relay_needed && !o->db_broken)
		relay(o);
	if (o->db_broken)
		return;
	/* Sleep until the next thing is due, or a notification. */
	long long wait = o->cfg.relay_wait_ms;
	now = gp_now_ms();
	if (o->next_reap_ms - now < wait)
		wait = o->next_reap_ms - now;
	if (o->next_sweep_ms - now < wait)
		wait = o->next_sweep_ms - now;
	for (int i = 0; i < o->ndues; i++)
		if (o->dues[i].at_ms - now < wait)
			wait = o->dues[i].at_ms - now;
	if (o->npending || o->relay_needed)
		wait = 0;
	wait_notifications(o, wait > 0 ? wait : 0);
}

void gp_orchestrator_run(struct gp_orchestrator *o, volatile int *stop)
{
	while (!*stop)
		gp_orchestrator_step(o);
}
