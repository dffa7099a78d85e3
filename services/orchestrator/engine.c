/*
 * engine.c: the DAG engine (see engine.h).
 */
#include "engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "outbox.h"
#include "spec.h"
#include "worker.h"

#define LEASE_MS 30000

struct stage {
	const cJSON *spec;      /* borrowed from the spec document */
	const int *needs;       /* indices of the stages it needs (borrowed) */
	int nneeds;
	const char *name, *kind;
	char state[16];
	int base;               /* attempt_base */
	int due;                /* not_before has passed */
	long long due_in;       /* ms until not_before */
	const char *outputs_text; /* borrowed from the stage rows; parsed on demand */
	int outputs_loaded;
	cJSON *outputs;         /* owned */
	/* latest attempt */
	long long aid;
	int attempt;
	char astate[16];
	int retryable;
	char *aerror;
	cJSON *aoutputs;        /* owned */
	int timed_out;
	long long timeout_in;
	long long reused_run;   /* the attempt reused outputs of this run's attempt */
	/* the row's write and the attempt to enqueue, deferred to flush(): an
	 * advance writes all its stages in one statement and its attempts in
	 * two, not three round trips per stage */
	int dirty, w_queued;
	char *w_outputs, *w_error; /* owned */
	char w_key[65];
	long long w_nb;
	long long w_cached_from; /* the run whose outputs it reused (0: none) */
	int enq;
	struct gp_attempt_spec enq_spec;
	char *enq_params;       /* owned */
};

static void stage_free_writes(struct stage *s)
{
	free(s->w_outputs);
	free(s->w_error);
	free(s->enq_params);
	s->w_outputs = s->w_error = s->enq_params = NULL;
	s->dirty = s->w_queued = s->enq = 0;
	s->w_key[0] = 0;
	s->w_cached_from = 0;
}

/* A number from the normalized spec; the spec layer guarantees presence,
 * this guards the cast anyway (a NaN cast to int is undefined). */
static long long num(const cJSON *o, const char *key, long long def)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
	if (!cJSON_IsNumber(v) || v->valuedouble != v->valuedouble || v->valuedouble < -1e15 ||
	    v->valuedouble > 1e15)
		return def;
	return (long long)v->valuedouble;
}

/* A big run's every row goes through these on every advance: the first
 * byte tells the eight stage states apart down to two. */
static int final_state(const char *s)
{
	switch (s[0]) {
	case 's': return !strcmp(s, "succeeded") || !strcmp(s, "skipped");
	case 'c': return !strcmp(s, "cached") || !strcmp(s, "cancelled");
	case 'f': return !strcmp(s, "failed");
	default: return 0;
	}
}

static int ok_state(const char *s)
{
	switch (s[0]) {
	case 's': return !strcmp(s, "succeeded");
	case 'c': return !strcmp(s, "cached");
	default: return 0;
	}
}

/* queued or retrying: the stages whose attempts an advance reads */
static int active_state(const char *s)
{
	return (s[0] == 'q' && !strcmp(s, "queued")) || (s[0] == 'r' && !strcmp(s, "retrying"));
}

/* the advance in progress's job messages, for the caller to publish (may be NULL) */
static struct gp_outbox_direct *direct_sink;
/* run_stages rows this process has written (each bumps the run's revision) */
static long long rows_written;
static long long reads_all, reads_active;
/* set_stage recorded a succeeded or cached stage that flush has not written */
static int unflushed_outputs;

void gp_engine_stage_reads(long long *all, long long *active)
{
	*all = reads_all;
	*active = reads_active;
}

/* Set a stage's state; the row is written by flush(). NULL outputs and
 * cache_key keep the row's; error replaces it; not_before_ms >= 0 sets the
 * row's not_before that far from the flush, else clears it. */
static gp_status set_stage(struct gp_db *db, long long run_id, struct stage *s, const char *state,
			   const char *outputs, const char *error, const char *cache_key,
			   long long not_before_ms, struct gp_err *err)
{
	(void)db;
	(void)run_id;
	char *o = NULL, *e = NULL;
	if ((outputs && !(o = strdup(outputs))) || (error && !(e = strdup(error)))) {
		free(o);
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	if (o) {
		free(s->w_outputs);
		s->w_outputs = o;
	}
	free(s->w_error);
	s->w_error = e;
	if (cache_key)
		snprintf(s->w_key, sizeof s->w_key, "%s", cache_key);
	s->w_nb = not_before_ms;
	s->w_queued |= !strcmp(state, "queued");
	s->dirty = 1;
	unflushed_outputs |= !strcmp(state, "succeeded") || !strcmp(state, "cached");
	snprintf(s->state, sizeof s->state, "%s", state);
	return GP_OK;
}

/* Write what set_stage and dispatch deferred: the attempts with their job
 * messages, then every changed stage row in one statement. */
static gp_status flush(struct gp_db *db, long long run_id, struct stage *st, int n,
		       struct gp_err *err)
{
	int nenq = 0, ndirty = 0;
	for (int i = 0; i < n; i++) {
		nenq += st[i].enq;
		ndirty += st[i].dirty;
	}
	gp_status rc = GP_OK;
	if (nenq) {
		struct gp_attempt_spec *specs = calloc((size_t)nenq, sizeof *specs);
		long long *ids = calloc((size_t)nenq, sizeof *ids);
		int k = 0;
		if (!specs || !ids)
			rc = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		for (int i = 0; !rc && i < n; i++)
			if (st[i].enq)
				specs[k++] = st[i].enq_spec;
		if (!rc)
			rc = gp_attempts_enqueue(db, specs, nenq, ids, direct_sink, err);
		k = 0;
		for (int i = 0; !rc && i < n; i++) {
			if (!st[i].enq)
				continue;
			st[i].aid = ids[k++];
			st[i].enq = 0;
			free(st[i].enq_params);
			st[i].enq_params = NULL;
		}
		free(specs);
		free(ids);
		if (rc)
			return rc;
	}
	if (!ndirty) {
		unflushed_outputs = 0;
		return GP_OK;
	}
	struct gp_db_array a[8] = { 0 };
	for (int i = 0; i < n; i++) {
		struct stage *s = &st[i];
		if (!s->dirty)
			continue;
		gp_db_array_add(&a[0], s->name);
		gp_db_array_add(&a[1], s->state);
		gp_db_array_add(&a[2], s->w_outputs);
		gp_db_array_add(&a[3], s->w_error);
		gp_db_array_add(&a[4], s->w_key[0] ? s->w_key : NULL);
		if (s->w_nb >= 0)
			gp_db_array_add_int(&a[5], s->w_nb);
		else
			gp_db_array_add(&a[5], NULL);
		gp_db_array_add(&a[6], s->w_queued ? "t" : "f");
		if (s->w_cached_from > 0)
			gp_db_array_add_int(&a[7], s->w_cached_from);
		else
			gp_db_array_add(&a[7], NULL);
	}
	char rid[24];
	snprintf(rid, sizeof rid, "%lld", run_id);
	const char *p[9] = { rid };
	rc = gp_db_arrays_text(a, 8, p + 1, err);
	/* queued: it goes out with the advance's next statement or its commit,
	 * and counts itself in rows_written when it wrote rows */
	if (!rc)
		rc = gp_db_queue(
			db, "update stages",
			"UPDATE run_stages rs SET state = u.state, "
			"outputs = coalesce(u.outputs::jsonb, rs.outputs), error = u.error, "
			"cache_key = coalesce(u.cache_key, rs.cache_key), "
			"cached_from = coalesce(u.cached_from, rs.cached_from), "
			"not_before = CASE WHEN u.nb IS NULL THEN NULL "
			"  ELSE clock_timestamp() + u.nb * interval '1 millisecond' END, "
			"queued_at = CASE WHEN u.queued THEN coalesce(rs.queued_at, now()) "
			"  ELSE rs.queued_at END, "
			"finished_at = CASE WHEN u.state IN ('succeeded','cached','failed','skipped',"
			"'cancelled') THEN now() ELSE NULL END "
			"FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], "
			"$7::bigint[], $8::boolean[], $9::bigint[]) AS u(stage, state, outputs, error, "
			"cache_key, nb, queued, cached_from) "
			"WHERE rs.run_id = $1::bigint AND rs.stage = u.stage",
			9, p, &rows_written, err);
	gp_db_arrays_free(a, 8);
	if (rc)
		return rc;
	unflushed_outputs = 0;
	for (int i = 0; i < n; i++)
		if (st[i].dirty) {
			free(st[i].w_outputs);
			free(st[i].w_error);
			st[i].w_outputs = st[i].w_error = NULL;
			st[i].dirty = st[i].w_queued = 0;
			st[i].w_key[0] = 0;
		}
	return GP_OK;
}

static long long backoff_ms(const cJSON *retry, int used)
{
	double b = (double)num(retry, "backoff_ms", 1000);
	double mx = (double)num(retry, "max_backoff_ms", 60000);
	for (int i = 1; i < used && b < mx; i++)
		b *= 2;
	return (long long)(b < mx ? b : mx);
}

/*
 * Parsed specs by pipeline version (versions are immutable), with each
 * stage's needs resolved to indices once: a run of N stages is advanced many
 * times, and a fan-in stage can need thousands of others.
 */
struct spec_entry {
	long long pv_id;
	cJSON *doc;
	int n;
	int **needs;
	int *nneeds;
	int *by_name;      /* stage indices sorted by name */
	int **refs;        /* stages each one's `with` refers to (${stages.X...}) */
	int *nrefs;
	const cJSON **specs; /* each stage's object, name and kind (in doc) */
	const char **names, **kinds;
	long long used;
};
#define SPEC_CACHE 8
static struct spec_entry spec_cache[SPEC_CACHE];
static long long spec_clock;

static void spec_entry_clear(struct spec_entry *e)
{
	for (int i = 0; e->needs && i < e->n; i++)
		free(e->needs[i]);
	free(e->needs);
	free(e->nneeds);
	free(e->by_name);
	for (int i = 0; e->refs && i < e->n; i++)
		free(e->refs[i]);
	free(e->refs);
	free(e->nrefs);
	free(e->specs);
	free(e->names);
	free(e->kinds);
	cJSON_Delete(e->doc);
	memset(e, 0, sizeof *e);
}

static int name_cmp(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Build the entry for doc (takes ownership). NULL on out of memory. */
static struct spec_entry *spec_entry_fill(struct spec_entry *e, long long pv_id, cJSON *doc)
{
	const cJSON *stages = cJSON_GetObjectItemCaseSensitive(
		cJSON_GetObjectItemCaseSensitive(doc, "spec"), "stages");
	int n = cJSON_GetArraySize(stages);
	e->pv_id = pv_id;
	e->doc = doc;
	e->n = n;
	e->needs = calloc((size_t)n + 1, sizeof *e->needs);
	e->nneeds = calloc((size_t)n + 1, sizeof *e->nneeds);
	/* sorted (name, index) pairs for lookups: "name\0" strings point into doc */
	const char **names = calloc((size_t)n + 1, sizeof *names);
	if (!e->needs || !e->nneeds || !names) {
		free(names);
		spec_entry_clear(e);
		return NULL;
	}
	int i = 0;
	const cJSON *st;
	cJSON_ArrayForEach(st, stages)
		names[i++] = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(st, "name"));
	const char **sorted = malloc(sizeof *sorted * ((size_t)n + 1));
	if (!sorted) {
		free(names);
		spec_entry_clear(e);
		return NULL;
	}
	memcpy(sorted, names, sizeof *sorted * (size_t)n);
	qsort(sorted, (size_t)n, sizeof *sorted, name_cmp);
	/* names are unique (the spec layer checks): each sorted one has one index */
	if (!(e->by_name = malloc(sizeof *e->by_name * ((size_t)n + 1)))) {
		free(sorted);
		free(names);
		spec_entry_clear(e);
		return NULL;
	}
	for (int k = 0; k < n; k++)
		for (int j = 0; j < n; j++)
			if (names[j] == sorted[k]) {
				e->by_name[k] = j;
				break;
			}
	i = 0;
	cJSON_ArrayForEach(st, stages)
	{
		const cJSON *needs = cJSON_GetObjectItemCaseSensitive(st, "needs");
		int k = cJSON_GetArraySize(needs), m = 0;
		e->needs[i] = calloc((size_t)k + 1, sizeof **e->needs);
		if (!e->needs[i]) {
			free(sorted);
			free(names);
			spec_entry_clear(e);
			return NULL;
		}
		const cJSON *nd;
		cJSON_ArrayForEach(nd, needs)
		{
			const char *key = nd->valuestring;
			const char **hit = bsearch(&key, sorted, (size_t)n, sizeof *sorted, name_cmp);
			if (!hit)
				continue;
			for (int j = 0; j < n; j++) /* map the name back to its position */
				if (names[j] == *hit) {
					e->needs[i][m++] = j;
					break;
				}
		}
		e->nneeds[i] = m;
		i++;
	}
	/* the stages whose outputs each `with` refers to: a dispatch resolves
	 * its templates against those alone, not a map of all N */
	e->refs = calloc((size_t)n + 1, sizeof *e->refs);
	e->nrefs = calloc((size_t)n + 1, sizeof *e->nrefs);
	int ok = e->refs && e->nrefs;
	i = 0;
	cJSON_ArrayForEach(st, stages)
	{
		char *w = ok ? cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(st, "with"))
			     : NULL;
		for (const char *c = w; ok && c && (c = strstr(c, "${stages.")); ) {
			c += 9;
			size_t len = strcspn(c, ".}");
			char name[128];
			if (len == 0 || len >= sizeof name)
				continue;
			memcpy(name, c, len);
			name[len] = 0;
			const char *key = name;
			const char **hit = bsearch(&key, sorted, (size_t)n, sizeof *sorted, name_cmp);
			if (!hit)
				continue;
			int j = 0;
			while (j < n && names[j] != *hit)
				j++;
			int dup = 0;
			for (int k = 0; k < e->nrefs[i]; k++)
				dup |= e->refs[i][k] == j;
			if (dup || j == n)
				continue;
			int *nr = realloc(e->refs[i], sizeof *nr * (size_t)(e->nrefs[i] + 1));
			if (!nr) {
				ok = 0;
				break;
			}
			e->refs[i] = nr;
			e->refs[i][e->nrefs[i]++] = j;
		}
		free(w);
		i++;
	}
	free(sorted);
	free(names);
	e->specs = calloc((size_t)n + 1, sizeof *e->specs);
	e->names = calloc((size_t)n + 1, sizeof *e->names);
	e->kinds = calloc((size_t)n + 1, sizeof *e->kinds);
	if (!ok || !e->specs || !e->names || !e->kinds) {
		spec_entry_clear(e);
		return NULL;
	}
	i = 0;
	cJSON_ArrayForEach(st, stages)
	{
		e->specs[i] = st;
		e->names[i] = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(st, "name"));
		e->kinds[i] = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(st, "kind"));
		i++;
	}
	return e;
}

/* The cached entry for pv_id, fetching and parsing the spec when needed. */
static struct spec_entry *spec_get(struct gp_db *db, long long pv_id, struct gp_err *err)
{
	struct spec_entry *victim = &spec_cache[0];
	for (int i = 0; i < SPEC_CACHE; i++) {
		if (spec_cache[i].doc && spec_cache[i].pv_id == pv_id) {
			spec_cache[i].used = ++spec_clock;
			return &spec_cache[i];
		}
		if (spec_cache[i].used < victim->used)
			victim = &spec_cache[i];
	}
	char id[24];
	snprintf(id, sizeof id, "%lld", pv_id);
	const char *p[] = { id };
	PGresult *r = NULL;
	if (gp_db_exec(db, "read spec", "SELECT spec_json::text FROM pipeline_versions "
		       "WHERE id = $1::bigint", 1, p, &r, err))
		return NULL;
	cJSON *doc = PQntuples(r) == 1 ? cJSON_Parse(PQgetvalue(r, 0, 0)) : NULL;
	PQclear(r);
	if (!doc) {
		gp_err_set(err, GP_ERR_INTERNAL, "pipeline version %lld: spec unreadable", pv_id);
		return NULL;
	}
	spec_entry_clear(victim);
	if (!spec_entry_fill(victim, pv_id, doc)) {
		gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		return NULL;
	}
	victim->used = ++spec_clock;
	return victim;
}

/*
 * The stage rows of the runs this process advanced last, as the advance
 * left them, with the run's revision after its writes. Every statement
 * that writes a run's run_stages bumps runs.revision (a trigger,
 * migrations/0008), so a revision equal to the one kept means the rows are
 * as kept: the advance then reads only the latest attempts of its queued
 * and retrying stages, not all N rows (a 1000-stage fan-out is advanced
 * about once per finished stage). Anything else, or a mismatch between the
 * kept states and those active stages, reads every row again.
 */
struct run_entry {
	long long run_id, pv_id, revision;
	int n;
	char (*state)[16];
	int *base;
	char **outputs_text;  /* owned; parsed on demand */
	cJSON **outputs;      /* owned while kept, lent to the advance */
	long long used;
};
#define RUN_CACHE 16
static struct run_entry run_cache[RUN_CACHE];
static long long run_clock;

static void run_entry_clear(struct run_entry *e)
{
	for (int i = 0; i < e->n; i++) {
		if (e->outputs_text)
			free(e->outputs_text[i]);
		if (e->outputs)
			cJSON_Delete(e->outputs[i]);
	}
	free(e->state);
	free(e->base);
	free(e->outputs_text);
	free(e->outputs);
	memset(e, 0, sizeof *e);
}

static struct run_entry *run_entry_find(long long run_id)
{
	for (int i = 0; i < RUN_CACHE; i++)
		if (run_cache[i].n && run_cache[i].run_id == run_id)
			return &run_cache[i];
	return NULL;
}

static void run_entry_drop(long long run_id)
{
	struct run_entry *e = run_entry_find(run_id);
	if (e)
		run_entry_clear(e);
}

/* A stage's outputs, parsed from its row the first time they are needed. */
static const cJSON *stage_outputs(struct stage *s)
{
	if (!s->outputs_loaded) {
		s->outputs_loaded = 1;
		if (s->outputs_text)
			s->outputs = cJSON_Parse(s->outputs_text);
	}
	return s->outputs;
}

static void set_outputs(struct stage *s, cJSON *o)
{
	cJSON_Delete(s->outputs);
	s->outputs = o;
	s->outputs_loaded = 1;
}

/* Keep the stage rows of st as the run's state at revision (takes the
 * parsed outputs; texts are copied). Out of memory keeps nothing. */
static void run_entry_save(long long run_id, long long pv_id, long long revision, struct stage *st,
			   int n)
{
	/* built aside first: the texts of st may point into the entry it replaces */
	struct run_entry ne = { .run_id = run_id, .pv_id = pv_id, .revision = revision, .n = n };
	ne.state = calloc((size_t)n, sizeof *ne.state);
	ne.base = calloc((size_t)n, sizeof *ne.base);
	ne.outputs_text = calloc((size_t)n, sizeof *ne.outputs_text);
	ne.outputs = calloc((size_t)n, sizeof *ne.outputs);
	int ok = ne.state && ne.base && ne.outputs_text && ne.outputs;
	for (int i = 0; ok && i < n; i++) {
		struct stage *s = &st[i];
		memcpy(ne.state[i], s->state, sizeof ne.state[i]);
		ne.base[i] = s->base;
		if (s->outputs_loaded) {
			ne.outputs[i] = s->outputs;
			s->outputs = NULL;
		} else if (s->outputs_text) {
			ok = (ne.outputs_text[i] = strdup(s->outputs_text)) != NULL;
		}
	}
	struct run_entry *e = run_entry_find(run_id);
	if (!e) {
		e = &run_cache[0];
		for (int i = 1; i < RUN_CACHE; i++)
			if (run_cache[i].used < e->used)
				e = &run_cache[i];
	}
	run_entry_clear(e);
	if (!ok) {
		run_entry_clear(&ne);
		return;
	}
	*e = ne;
	e->used = ++run_clock;
}

/*
 * Dispatch attempt `attempt` of stage i, or serve it from the cache. Its
 * templates resolve against the outputs of the stages its `with` refers to
 * (se->refs, by reference: no copies), whatever the size of the run.
 */
static gp_status dispatch(struct gp_db *db, long long run_id, struct stage *st, int n, int i,
			  int attempt, const cJSON *params, const char *kind_version,
			  int *dispatched, const struct spec_entry *se, struct gp_err *err)
{
	struct stage *s = &st[i];
	gp_status rc = GP_OK;
	cJSON *needs_out = cJSON_CreateObject();
	cJSON *with = NULL;
	char *wtext = NULL, *ntext = NULL, *keytext = NULL;
	PGresult *r = NULL;
	cJSON *outs = cJSON_CreateObject();
	for (int k = 0; outs && k < se->nrefs[i]; k++) {
		const cJSON *o = stage_outputs(&st[se->refs[i][k]]);
		if (o)
			cJSON_AddItemReferenceToObject(outs, st[se->refs[i][k]].name, (cJSON *)o);
	}
	for (int k = 0; k < s->nneeds; k++) {
		int j = s->needs[k];
		const cJSON *o = stage_outputs(&st[j]);
		if (o)
			cJSON_AddItemReferenceToObject(needs_out, st[j].name, (cJSON *)o);
		else
			cJSON_AddItemToObject(needs_out, st[j].name, cJSON_CreateNull());
	}
	struct gp_err rerr = { 0 };
	with = gp_spec_resolve_with(cJSON_GetObjectItemCaseSensitive(s->spec, "with"), params, outs,
				    &rerr);
	if (!with) {
		char msg[600];
		snprintf(msg, sizeof msg, "could not resolve parameters: %s", rerr.msg);
		rc = set_stage(db, run_id, s, "failed", NULL, msg, NULL, -1, err);
		goto out;
	}
	wtext = cJSON_PrintUnformatted(with);
	ntext = cJSON_PrintUnformatted(needs_out);
	char key[65] = "";
	/* A kind no worker has registered yet has no code version: its result
	 * gets no cache key (a later run would compute another key once the
	 * worker registers, and a key without a version must not match). A
	 * kind registered as uncached depends on more than its inputs. */
	int cache = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(s->spec, "cache")) &&
		    strcmp(kind_version, "unregistered") != 0 &&
		    strcmp(kind_version, GP_KIND_UNCACHED) != 0;
	size_t kl = strlen(s->kind) + strlen(kind_version) + strlen(wtext) + strlen(ntext) + 8;
	keytext = malloc(kl);
	if (!wtext || !ntext || !keytext) {
		rc = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto out;
	}
	snprintf(keytext, kl, "%s\n%s\n%s\n%s", s->kind, kind_version, wtext, ntext);
	gp_sha256_hex(keytext, strlen(keytext), key);
	if (cache && !gp_spec_kind_external(s->kind)) {
		/* the lookup must see a sibling that succeeded in this advance */
		if (unflushed_outputs && (rc = flush(db, run_id, st, n, err)))
			goto out;
		char rid[24];
		snprintf(rid, sizeof rid, "%lld", run_id);
		const char *p[] = { key, rid, s->name };
		if ((rc = gp_db_exec(db, "look up cache",
				     "SELECT run_id, outputs::text FROM run_stages WHERE cache_key = $1 "
				     "AND state = 'succeeded' AND outputs IS NOT NULL "
				     "AND NOT (run_id = $2::bigint AND stage = $3) "
				     "ORDER BY finished_at DESC LIMIT 1",
				     3, p, &r, err)))
			goto out;
		if (PQntuples(r) == 1) {
			s->w_cached_from = atoll(PQgetvalue(r, 0, 0));
			if ((rc = set_stage(db, run_id, s, "cached", PQgetvalue(r, 0, 1), NULL, key, -1,
					    err)))
				goto out;
			set_outputs(s, cJSON_Parse(PQgetvalue(r, 0, 1)));
			goto out;
		}
	}
	const cJSON *retry = cJSON_GetObjectItemCaseSensitive(s->spec, "retry");
	int limit = (int)num(retry, "limit", 0);
	/* written by flush() with the other attempts of this advance */
	free(s->enq_params);
	s->enq_params = wtext;
	wtext = NULL;
	s->enq_spec = (struct gp_attempt_spec){
		.run_id = run_id,
		.stage = s->name,
		.kind = s->kind,
		.attempt = attempt,
		.params_json = s->enq_params,
		.lease_ms = LEASE_MS,
		.max_attempts = s->base + limit + 1,
		.timeout_ms = num(s->spec, "timeout_ms", 86400000LL),
	};
	s->enq = 1;
	s->aid = 0;
	s->attempt = attempt;
	snprintf(s->astate, sizeof s->astate, "queued");
	if (dispatched)
		(*dispatched)++;
	rc = set_stage(db, run_id, s, "queued", NULL, NULL, cache ? key : NULL, -1, err);
out:
	PQclear(r);
	cJSON_Delete(needs_out);
	cJSON_Delete(outs); /* references only */
	cJSON_Delete(with);
	free(wtext);
	free(ntext);
	free(keytext);
	return rc;
}

static const char *kind_version(const cJSON *kinds, const char *kind)
{
	const char *v = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(kinds, kind));
	if (v)
		return v;
	return "unregistered";
}

/* Columns of a stage row as both reads return them. */
#define STAGE_COLUMNS                                                                          \
	"rs.stage, rs.state, rs.attempt_base, "                                                \
	"coalesce(rs.not_before <= clock_timestamp(), true), "                                 \
	"coalesce((extract(epoch FROM rs.not_before - clock_timestamp()) * 1000)::bigint, 0), " \
	"%s, a.id, a.attempt, a.state, a.retryable, a.error, a.outputs::text, "                \
	"coalesce(a.state = 'running' AND a.claimed_at + a.timeout_ms * "                      \
	"interval '1 millisecond' < clock_timestamp(), false), "                               \
	"coalesce((extract(epoch FROM a.claimed_at + a.timeout_ms * interval "                 \
	"'1 millisecond' - clock_timestamp()) * 1000)::bigint, -1), "                          \
	"(SELECT z.run_id FROM stage_attempts z WHERE z.id = a.reused_from) "

/* Row i of rows into s: the stage's columns, its outputs when with_outputs,
 * and its latest attempt when the row has one. */
static void fill_row(struct stage *s, PGresult *rows, int i, int with_outputs)
{
	snprintf(s->state, sizeof s->state, "%s", PQgetvalue(rows, i, 1));
	s->base = atoi(PQgetvalue(rows, i, 2));
	s->due = PQgetvalue(rows, i, 3)[0] == 't';
	s->due_in = atoll(PQgetvalue(rows, i, 4));
	if (with_outputs && !PQgetisnull(rows, i, 5))
		s->outputs_text = PQgetvalue(rows, i, 5);
	if (!PQgetisnull(rows, i, 6)) {
		s->aid = atoll(PQgetvalue(rows, i, 6));
		s->attempt = atoi(PQgetvalue(rows, i, 7));
		snprintf(s->astate, sizeof s->astate, "%s", PQgetvalue(rows, i, 8));
		s->retryable = PQgetvalue(rows, i, 9)[0] == 't';
		s->aerror = PQgetisnull(rows, i, 10) ? NULL : strdup(PQgetvalue(rows, i, 10));
		if (!PQgetisnull(rows, i, 11))
			s->aoutputs = cJSON_Parse(PQgetvalue(rows, i, 11));
		s->timed_out = PQgetvalue(rows, i, 12)[0] == 't';
		s->timeout_in = atoll(PQgetvalue(rows, i, 13));
		s->reused_run = PQgetisnull(rows, i, 14) ? 0 : atoll(PQgetvalue(rows, i, 14));
	}
}

/* Forget what the stages were filled with (their spec bindings stay). */
static void reset_rows(struct stage *st, int n)
{
	for (int i = 0; i < n; i++) {
		struct stage *s = &st[i];
		cJSON_Delete(s->outputs);
		cJSON_Delete(s->aoutputs);
		free(s->aerror);
		stage_free_writes(s);
		const cJSON *spec = s->spec;
		const int *needs = s->needs;
		int nneeds = s->nneeds;
		const char *name = s->name, *kind = s->kind;
		memset(s, 0, sizeof *s);
		s->spec = spec;
		s->needs = needs;
		s->nneeds = nneeds;
		s->name = name;
		s->kind = kind;
	}
}

/* Every stage row of the run, in spec order, with the latest attempt of
 * each queued or retrying stage. */
static gp_status read_all(struct gp_db *db, long long run_id, struct stage *st, int n,
			  PGresult **rows, struct gp_err *err)
{
	char rid[24];
	snprintf(rid, sizeof rid, "%lld", run_id);
	const char *p[] = { rid };
	reset_rows(st, n);
	PQclear(*rows);
	*rows = NULL;
	char sql[2048];
	snprintf(sql, sizeof sql,
		 "SELECT " STAGE_COLUMNS
		 "FROM run_stages rs LEFT JOIN (SELECT DISTINCT ON (x.stage) x.* "
		 "FROM stage_attempts x JOIN run_stages q ON q.run_id = x.run_id "
		 "AND q.stage = x.stage AND q.state IN ('queued', 'retrying') "
		 "WHERE x.run_id = $1::bigint "
		 "ORDER BY x.stage, x.attempt DESC) a ON a.stage = rs.stage "
		 "WHERE rs.run_id = $1::bigint ORDER BY rs.position",
		 "rs.outputs::text");
	gp_status rc = gp_db_exec(db, "read stages", sql, 1, p, rows, err);
	if (rc)
		return rc;
	if (PQntuples(*rows) != n)
		return gp_err_set(err, GP_ERR_INTERNAL, "run %lld: %d stage rows for %d stages in "
				  "the spec", run_id, PQntuples(*rows), n);
	for (int i = 0; i < n; i++) {
		if (strcmp(st[i].name, PQgetvalue(*rows, i, 0)) != 0)
			return gp_err_set(err, GP_ERR_INTERNAL, "run %lld: stage rows do not match "
					  "the spec", run_id);
		fill_row(&st[i], *rows, i, 1);
	}
	return GP_OK;
}

/* The index of the stage called name, or -1. */
static int stage_index(const struct spec_entry *se, const struct stage *st, const char *name)
{
	int lo = 0, hi = se->n - 1;
	while (lo <= hi) {
		int mid = lo + (hi - lo) / 2, c = strcmp(name, st[se->by_name[mid]].name);
		if (!c)
			return se->by_name[mid];
		if (c < 0)
			hi = mid - 1;
		else
			lo = mid + 1;
	}
	return -1;
}

/*
 * The kept rows, lent to st, and the rows of the queued and retrying
 * stages with their latest attempts read now. *hit = 0 when the database
 * does not agree with what was kept (then st is to be read again whole).
 */
static gp_status read_active(struct gp_db *db, long long run_id, const struct spec_entry *se,
			     struct stage *st, struct run_entry *kept, PGresult **rows, int *hit,
			     struct gp_err *err)
{
	int n = se->n, active = 0;
	for (int i = 0; i < n; i++) {
		struct stage *s = &st[i];
		memcpy(s->state, kept->state[i], sizeof s->state);
		s->base = kept->base[i];
		if (kept->outputs[i]) {
			s->outputs = kept->outputs[i]; /* lent: given back by run_entry_save */
			kept->outputs[i] = NULL;
			s->outputs_loaded = 1;
		} else {
			s->outputs_text = kept->outputs_text[i];
		}
		active += active_state(s->state);
	}
	if (!active)
		return GP_OK;
	char rid[24];
	snprintf(rid, sizeof rid, "%lld", run_id);
	const char *p[] = { rid };
	char sql[2048];
	snprintf(sql, sizeof sql,
		 "SELECT " STAGE_COLUMNS
		 "FROM run_stages rs LEFT JOIN LATERAL (SELECT * FROM stage_attempts x "
		 "WHERE x.run_id = rs.run_id AND x.stage = rs.stage ORDER BY x.attempt DESC "
		 "LIMIT 1) a ON true "
		 "WHERE rs.run_id = $1::bigint AND rs.state IN ('queued', 'retrying')",
		 "NULL");
	gp_status rc = gp_db_exec(db, "read active stages", sql, 1, p, rows, err);
	if (rc)
		return rc;
	if (PQntuples(*rows) != active) {
		*hit = 0;
		return GP_OK;
	}
	for (int r = 0; r < PQntuples(*rows); r++) {
		int i = stage_index(se, st, PQgetvalue(*rows, r, 0));
		if (i < 0 || strcmp(st[i].state, PQgetvalue(*rows, r, 1)) != 0 ||
		    st[i].base != atoi(PQgetvalue(*rows, r, 2))) {
			*hit = 0;
			return GP_OK;
		}
		fill_row(&st[i], *rows, r, 0);
	}
	return GP_OK;
}

gp_status gp_engine_advance(struct gp_db *db, long long run_id, long long *due_ms,
			    int *dispatched, struct gp_outbox_direct *direct, struct gp_err *err)
{
	direct_sink = direct;
	int direct0 = direct ? direct->n : 0;
	char rid[24];
	snprintf(rid, sizeof rid, "%lld", run_id);
	const char *p[] = { rid };
	PGresult *r = NULL, *rows = NULL;
	cJSON *kinds = NULL;
	cJSON *params = NULL;
	struct spec_entry *se = NULL;
	struct stage *st = NULL;
	int n = 0;
	long long due = -1;
	if (due_ms)
		*due_ms = -1;
	/* BEGIN goes out with the lock, in one round trip */
	gp_status rc = gp_db_queue_begin(db, err);
	if (rc)
		return rc;
	if ((rc = gp_db_exec(db, "lock run",
			     "SELECT state, params::text, pipeline_version_id, revision, "
			     "(SELECT coalesce(json_object_agg(kind, version), '{}')::text "
			     "FROM stage_kinds) FROM runs WHERE id = $1::bigint FOR UPDATE",
			     1, p, &r, err)))
		goto rollback;
	if (PQntuples(r) != 1) {
		rc = gp_err_set(err, GP_ERR_NOT_FOUND, "run %lld does not exist", run_id);
		goto rollback;
	}
	const char *rstate = PQgetvalue(r, 0, 0);
	long long pv_id = atoll(PQgetvalue(r, 0, 2)), revision = atoll(PQgetvalue(r, 0, 3));
	long long writes0 = rows_written;
	unflushed_outputs = 0;
	if (final_state(rstate)) {
		run_entry_drop(run_id);
		rc = gp_db_commit(db, err);
		goto out;
	}
	params = cJSON_Parse(PQgetvalue(r, 0, 1));
	if (!(se = spec_get(db, pv_id, err))) {
		rc = err ? err->status : GP_ERR_INTERNAL;
		goto rollback;
	}
	const cJSON *stages = cJSON_GetObjectItemCaseSensitive(
		cJSON_GetObjectItemCaseSensitive(se->doc, "spec"), "stages");
	if (!params || !cJSON_IsArray(stages)) {
		/* Not something a retry can fix: fail the run and say why. */
		const char *pp[] = { rid };
		gp_warn("run %lld: its stored spec or params are unreadable; failing it", run_id);
		if ((rc = gp_db_exec(db, "fail unreadable run",
				     "UPDATE runs SET state = 'failed', finished_at = now(), "
				     "updated_at = now(), error = 'stored spec or params unreadable' "
				     "WHERE id = $1::bigint",
				     1, pp, NULL, err)))
			goto rollback;
		run_entry_drop(run_id);
		rc = gp_db_commit(db, err);
		goto out;
	}
	kinds = cJSON_Parse(PQgetvalue(r, 0, 4));
	n = se->n;
	if (!(st = calloc((size_t)n + 1, sizeof *st))) {
		rc = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto rollback;
	}
	for (int i = 0; i < n; i++) {
		struct stage *s = &st[i];
		s->spec = se->specs[i];
		s->needs = se->needs[i];
		s->nneeds = se->nneeds[i];
		s->name = se->names[i];
		s->kind = se->kinds[i];
		if (!s->name || !s->kind) {
			rc = gp_err_set(err, GP_ERR_INTERNAL, "run %lld: a stage without name or kind",
					run_id);
			goto rollback;
		}
	}
	/* the rows as this process left them, when nobody wrote since */
	struct run_entry *kept = run_entry_find(run_id);
	int hit = kept && kept->pv_id == pv_id && kept->revision == revision && kept->n == n;
	if (hit && (rc = read_active(db, run_id, se, st, kept, &rows, &hit, err)))
		goto rollback;
	if (!hit) {
		run_entry_drop(run_id);
		if ((rc = read_all(db, run_id, st, n, &rows, err)))
			goto rollback;
		reads_all++;
	} else {
		reads_active++;
	}
	/* spec.parallelism: stages dispatched and not yet final count against it. */
	long long parallelism = num(cJSON_GetObjectItemCaseSensitive(se->doc, "spec"),
				    "parallelism", 0);
	int in_flight = 0;
	for (int i = 0; i < n; i++)
		in_flight += !strcmp(st[i].state, "queued");
	int changed = 1, any_started = 0;
	for (int pass = 0; changed && pass <= n + 1; pass++) {
		changed = 0;
		for (int i = 0; i < n; i++) {
			struct stage *s = &st[i];
			/* most rows of a big run are final */
			if (final_state(s->state))
				continue;
			const cJSON *retry = cJSON_GetObjectItemCaseSensitive(s->spec, "retry");
			int limit = (int)num(retry, "limit", 0);
			if (!strcmp(s->state, "queued")) {
				any_started = 1;
				if (!strcmp(s->astate, "running") && s->timed_out) {
					char id[24], msg[128];
					snprintf(id, sizeof id, "%lld", s->aid);
					snprintf(msg, sizeof msg, "timed out after %lld ms",
						 num(s->spec, "timeout_ms", 0));
					const char *pp[] = { id, msg };
					PGresult *u = NULL;
					if ((rc = gp_db_exec(db, "time out attempt",
							     "UPDATE stage_attempts SET state = 'failed', "
							     "error = $2, finished_at = now(), "
							     "lease_deadline = NULL, retryable = true "
							     "WHERE id = $1::bigint AND state = 'running' "
							     "RETURNING id",
							     2, pp, &u, err)))
						goto rollback;
					if (PQntuples(u) == 1) {
						snprintf(s->astate, sizeof s->astate, "failed");
						free(s->aerror);
						s->aerror = strdup(msg);
						s->retryable = 1;
						gp_info("run %lld stage %s attempt %d: %s", run_id,
							s->name, s->attempt, msg);
					}
					PQclear(u);
				}
				if (!strcmp(s->astate, "queued") || !strcmp(s->astate, "running")) {
					if (!strcmp(s->astate, "running") && s->timeout_in >= 0 &&
					    (due < 0 || s->timeout_in < due))
						due = s->timeout_in;
					continue;
				}
				changed = 1;
				in_flight--; /* this stage's attempt is final now */
				if (!strcmp(s->astate, "succeeded")) {
					char *o = s->aoutputs ? cJSON_PrintUnformatted(s->aoutputs)
							      : strdup("{}");
					if (s->reused_run > 0) {
						/* the worker reused an earlier attempt's outputs */
						s->w_cached_from = s->reused_run;
					}
					if (!rc)
						rc = set_stage(db, run_id, s,
							       s->reused_run > 0 ? "cached"
										 : "succeeded",
							       o, NULL, NULL, -1, err);
					free(o);
					if (rc)
						goto rollback;
					set_outputs(s, s->aoutputs ? cJSON_Duplicate(s->aoutputs, 1)
								   : cJSON_CreateObject());
					continue;
				}
				if (!strcmp(s->astate, "cancelled")) {
					if ((rc = set_stage(db, run_id, s, "cancelled", NULL,
							    s->aerror, NULL, -1, err)))
						goto rollback;
					continue;
				}
				/* failed, expired or released without a successor */
				int used = s->attempt - s->base;
				char msg[700];
				snprintf(msg, sizeof msg, "attempt %d: %s", s->attempt,
					 s->aerror ? s->aerror : s->astate);
				if ((s->retryable || strcmp(s->astate, "failed") != 0) &&
				    used < limit + 1) {
					long long b = backoff_ms(retry, used);
					if ((rc = set_stage(db, run_id, s, "retrying", NULL, msg, NULL,
							    b, err)))
						goto rollback;
					s->due = b <= 0;
					s->due_in = b;
				} else {
					char fmsg[800];
					snprintf(fmsg, sizeof fmsg, "%s (%d of %d attempts used%s)", msg,
						 used, limit + 1,
						 s->retryable ? "" : "; not retryable");
					if ((rc = set_stage(db, run_id, s, "failed", NULL, fmsg, NULL,
							    -1, err)))
						goto rollback;
					continue;
				}
			}
			if (!strcmp(s->state, "retrying")) {
				any_started = 1;
				if (!s->due) {
					if (due < 0 || s->due_in < due)
						due = s->due_in;
					continue;
				}
				if (parallelism > 0 && in_flight >= parallelism)
					continue;
				changed = 1;
				if ((rc = dispatch(db, run_id, st, n, i, s->attempt + 1, params,
						   kind_version(kinds, s->kind), dispatched,
						   se, err)))
					goto rollback;
				in_flight += !strcmp(s->state, "queued");
				continue;
			}
			if (!strcmp(s->state, "pending")) {
				int ready = 1, blocked = 0;
				for (int k = 0; k < s->nneeds; k++) {
					int j = s->needs[k];
					if (!ok_state(st[j].state))
						ready = 0;
					if (!strcmp(st[j].state, "failed") ||
					    !strcmp(st[j].state, "skipped") ||
					    !strcmp(st[j].state, "cancelled"))
						blocked = 1;
				}
				if (blocked) {
					changed = 1;
					if ((rc = set_stage(db, run_id, s, "skipped", NULL,
							    "an upstream stage did not succeed", NULL,
							    -1, err)))
						goto rollback;
				} else if (ready && (parallelism <= 0 || in_flight < parallelism)) {
					changed = 1;
					any_started = 1;
					if ((rc = dispatch(db, run_id, st, n, i,
							   (s->attempt > s->base ? s->attempt : s->base) + 1,
							   params, kind_version(kinds, s->kind),
							   dispatched, se, err)))
						goto rollback;
					in_flight += !strcmp(s->state, "queued");
				}
			}
		}
	}
	if ((rc = flush(db, run_id, st, n, err)))
		goto rollback;
	int all_final = 1, all_ok = 1;
	for (int i = 0; i < n; i++) {
		all_final &= final_state(st[i].state);
		all_ok &= ok_state(st[i].state);
	}
	if (all_final) {
		const char *pp[] = { rid, all_ok ? "succeeded" : "failed" };
		rc = gp_db_queue(db, "finish run",
				"UPDATE runs SET state = $2, finished_at = now(), updated_at = now(), "
				"started_at = coalesce(started_at, now()), "
				"error = CASE WHEN $2 = 'failed' THEN (SELECT string_agg(stage || ': ' "
				"|| coalesce(error, state), '; ' ORDER BY position) FROM run_stages "
				"WHERE run_id = $1::bigint AND state = 'failed') END "
				"WHERE id = $1::bigint",
				2, pp, NULL, err);
		due = -1;
	} else if (any_started && !strcmp(rstate, "queued")) {
		rc = gp_db_queue(db, "start run",
				 "UPDATE runs SET state = 'running', started_at = now(), "
				 "updated_at = now() WHERE id = $1::bigint",
				 1, p, NULL, err);
	}
	if (rc)
		goto rollback;
	/* the stage and run writes go out with the commit, in one round trip */
	rc = gp_db_commit(db, err);
	if (!rc && all_final)
		gp_info("run %lld %s", run_id, all_ok ? "succeeded" : "failed");
	/* the run's row is locked: its stages' revision moved by our writes
	 * alone, one for each statement that wrote rows (counted as they ran) */
	revision += rows_written - writes0;
	if (!rc && due_ms)
		*due_ms = due;
	if (rc || all_final || revision < 0)
		run_entry_drop(run_id);
	else
		run_entry_save(run_id, pv_id, revision, st, n);
	goto out;
rollback:
	gp_db_rollback(db);
	run_entry_drop(run_id);
out:
	/* only committed messages may go out */
	if (rc && direct)
		gp_outbox_direct_truncate(direct, direct0);
	direct_sink = NULL;
	for (int i = 0; st && i < n; i++) {
		cJSON_Delete(st[i].outputs);
		cJSON_Delete(st[i].aoutputs);
		free(st[i].aerror);
		stage_free_writes(&st[i]);
	}
	free(st);
	cJSON_Delete(params);
	PQclear(r);
	PQclear(rows);
	cJSON_Delete(kinds);
	return rc;
}
