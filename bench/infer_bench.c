/*
 * infer_bench: a load generator for genpipe-infer on the local stack.
 *
 * Starts a private stack (nats-server with JetStream, PostgreSQL) in a
 * temporary directory, registers one model of the demo shape (4 layers,
 * width 256, context 128, vocabulary 4096; random weights: speed does not
 * depend on what the weights say) under two names, and serves each with
 * its own genpipe-infer:
 *   batched: --slots 32 (continuous batching);
 *   single:  --slots 1 --queue 64 (one request at a time, the peer).
 * Then C closed-loop clients (each its own NATS connection) send requests
 * for S seconds: a quarter greedy from 8 prompts (cacheable; the second
 * time they are cache hits), the rest sampled (temperature 0.8, top-k 40,
 * no seed: never cached), M new tokens each. Printed per phase: requests,
 * p50/p99 round trip, generated tokens/s, cache hit rate, and the service
 * overhead: round trip minus the model compute the service reports for
 * the request (its share of batched steps, sampling included), so the
 * NATS hops, decoding, tokenizing, queueing for a slot and waiting for the
 * step in progress.
 *
 * Phases: 1 client on the batched service (overhead of the path itself);
 * C clients batched; C clients single; and the ratio of tokens/s.
 *
 * usage: infer_bench [CLIENTS (32)] [SECONDS (10)] [MAX_TOKENS (32)]
 */
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "artifact.h"
#include "bpe.h"
#include "bus.h"
#include "db.h"
#include "model.h"
#include "registry.h"
#include "bench_stack.h"
#include "stack.h"
#include "subjects.h"
#include "wire.h"

static char dir[] = "/tmp/genpipe-ibench-XXXXXX";
static char nats_url[256], db_url[600];


static pid_t spawn_infer(const char *model, const char *slots, const char *queue)
{
	char bin[700], logp[700], e1[300], e2[700], name[64];
	snprintf(bin, sizeof bin, "%s/genpipe-infer", GENPIPE_BIN_DIR);
	snprintf(name, sizeof name, "infer-%s", model);
	gp_stack_log_path(dir, name, logp, sizeof logp);
	snprintf(e1, sizeof e1, "GENPIPE_NATS_URL=%s", nats_url);
	snprintf(e2, sizeof e2, "GENPIPE_DATABASE_URL=%s", db_url);
	char *envx[] = { e1, e2, "GENPIPE_LOG_LEVEL=warn", NULL };
	char *argv[] = { bin, "--model", (char *)model, "--slots", (char *)slots, "--queue",
			 (char *)queue, "--data-dir", dir, "--max-new-tokens", "256", NULL };
	int pid = 0;
	struct gp_err e = { 0 };
	fflush(NULL);
	if (gp_stack_spawn(argv, envx, logp, 1, &pid, &e)) {
		fprintf(stderr, "bench: %s\n", e.msg);
		exit(1);
	}
	return pid;
}

static void die(const char *what, const struct gp_err *e)
{
	fprintf(stderr, "bench: %s: %s\n", what, e->msg);
	exit(1);
}

/* The demo shape with random weights, registered as NAME version 1 @production. */
static void register_model(struct gp_db *db, struct gp_store *st, const char *tok_hash,
			   const char *ckpt_hash)
{
	struct gp_err e = { 0 };
	const char *names[] = { "bench-batched", "bench-single" };
	for (int i = 0; i < 2; i++) {
		char sql[1200];
		snprintf(sql, sizeof sql,
			 "INSERT INTO models (name) VALUES ('%s'); "
			 "INSERT INTO model_versions (model_id, version, artifact_id, metrics, lineage) "
			 "SELECT m.id, 1, a.id, '{}', '{\"tokenizer\": \"sha256:%s\"}' "
			 "FROM models m, artifacts a WHERE m.name = '%s' AND a.content_hash = '%s'",
			 names[i], tok_hash, names[i], ckpt_hash);
		if (gp_db_run(db, "register", sql, &e) ||
		    gp_registry_move_alias(db, names[i], "production", 1, "bench", NULL, NULL, &e))
			die("register", &e);
	}
	(void)st;
}

static const char *prompts[] = {
	"Q: What is the meaning of life?\nA:", "A fool and his money", "You will meet",
	"Never trust a", "The best things in life", "Why did the chicken", "In the beginning",
	"Love is",
};

struct sample {
	double rtt, compute, inside;
	int tokens, hit, error;
};

struct client {
	pthread_t th;
	const char *model;
	int id;
	double until;
	int max_tokens;
	struct sample *s;
	int n, cap;
	struct gp_bus *bus;
};

static void *client_main(void *arg)
{
	struct client *c = arg;
	uint64_t rng = 0x9e3779b97f4a7c15ULL * (uint64_t)(c->id + 1);
	char subject[128];
	snprintf(subject, sizeof subject, GP_SUBJ_INFER "%s", c->model);
	for (int i = 0; gp_mono_ms() < c->until; i++) {
		rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
		int greedy = (rng >> 33) % 4 == 0;
		Genpipe__V1__SamplingParams sp = GENPIPE__V1__SAMPLING_PARAMS__INIT;
		sp.max_tokens = (uint32_t)c->max_tokens;
		sp.temperature = greedy ? 0.0f : 0.8f;
		sp.top_k = greedy ? 0 : 40;
		sp.top_p = 1.0f;
		char rid[64];
		snprintf(rid, sizeof rid, "bench-%d-%d", c->id, i);
		gp_infer_request q = GENPIPE__V1__INFER_REQUEST__INIT;
		q.request_id = rid;
		q.model = (char *)c->model;
		q.prompt = (char *)prompts[(rng >> 40) % 8];
		q.sampling = &sp;
		uint8_t *buf = NULL;
		size_t len = 0;
		struct gp_err e = { 0 };
		if (gp_wire_encode(&q.base, &buf, &len, &e))
			die("encode", &e);
		natsMsg *reply = NULL;
		double t0 = gp_mono_ms();
		gp_status st = gp_bus_request(c->bus, subject, buf, (int)len, 60000, &reply, &e);
		double rtt = gp_mono_ms() - t0;
		free(buf);
		struct sample s = { .rtt = rtt, .error = 1 };
		gp_infer_response *r = NULL;
		if (!st && !gp_wire_decode_infer_response(&r, (const uint8_t *)natsMsg_GetData(reply),
							  (size_t)natsMsg_GetDataLength(reply), &e)) {
			s.error = r->error_code && *r->error_code;
			s.compute = r->compute_ms;
			s.inside = r->latency_ms - r->compute_ms;
			s.tokens = (int)r->output_tokens;
			s.hit = r->cache_hit;
			gp_wire_free_infer_response(r);
		}
		natsMsg_Destroy(reply);
		if (c->n == c->cap) {
			c->cap = c->cap ? 2 * c->cap : 1024;
			c->s = realloc(c->s, (size_t)c->cap * sizeof(*c->s));
		}
		c->s[c->n++] = s;
	}
	return NULL;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double pct(double *v, int n, double p)
{
	if (!n)
		return NAN;
	int i = (int)ceil(p * n) - 1;
	return v[i < 0 ? 0 : i];
}

struct result {
	int requests, errors;
	double p50, p99, tps, hit_rate, ov50, ov99, in50, hit50;
};

static struct result phase(const char *label, const char *model, int clients, double seconds,
			   int max_tokens)
{
	struct client *cs = calloc((size_t)clients, sizeof(*cs));
	struct gp_err e = { 0 };
	for (int i = 0; i < clients; i++) {
		cs[i].model = model;
		cs[i].id = i;
		cs[i].max_tokens = max_tokens;
		if (gp_bus_connect(&cs[i].bus, nats_url, "bench-client", GP_BUS_SEND_ASAP, 5000, &e))
			die("connect", &e);
	}
	double t0 = gp_mono_ms();
	for (int i = 0; i < clients; i++) {
		cs[i].until = t0 + seconds * 1000;
		pthread_create(&cs[i].th, NULL, client_main, &cs[i]);
	}
	for (int i = 0; i < clients; i++)
		pthread_join(cs[i].th, NULL);
	double wall = (gp_mono_ms() - t0) / 1000;
	int n = 0;
	for (int i = 0; i < clients; i++)
		n += cs[i].n;
	double *rtt = malloc((size_t)n * sizeof(double)), *ov = malloc((size_t)n * sizeof(double));
	double *in = malloc((size_t)n * sizeof(double));
	struct result r = { 0 };
	long long tokens = 0;
	int hits = 0, k = 0;
	for (int i = 0; i < clients; i++) {
		for (int j = 0; j < cs[i].n; j++) {
			struct sample *s = &cs[i].s[j];
			if (s->error) {
				r.errors++;
				continue;
			}
			rtt[k] = s->rtt;
			ov[k] = s->rtt - s->compute;
			in[k] = s->inside;
			k++;
			tokens += s->tokens;
			hits += s->hit;
		}
		free(cs[i].s);
		gp_bus_destroy(cs[i].bus);
	}
	{
		double *h = malloc((size_t)(hits + 1) * sizeof(double));
		int nh = 0;
		for (int i = 0; i < clients; i++)
			(void)i;
		for (int i = 0; i < k; i++)
			if (ov[i] == rtt[i] && nh < hits)
				h[nh++] = rtt[i];
		qsort(h, (size_t)nh, sizeof(double), cmp_double);
		r.hit50 = pct(h, nh, 0.5);
		free(h);
	}
	qsort(rtt, (size_t)k, sizeof(double), cmp_double);
	qsort(ov, (size_t)k, sizeof(double), cmp_double);
	qsort(in, (size_t)k, sizeof(double), cmp_double);
	r.in50 = pct(in, k, 0.5);
	r.requests = k;
	r.p50 = pct(rtt, k, 0.5);
	r.p99 = pct(rtt, k, 0.99);
	r.ov50 = pct(ov, k, 0.5);
	r.ov99 = pct(ov, k, 0.99);
	r.tps = (double)tokens / wall;
	r.hit_rate = k ? (double)hits / k : 0;
	printf("%-34s %6d %5d %9.2f %9.2f %10.0f %7.1f%% %9.3f %9.3f %9.3f %9.3f\n", label, r.requests,
	       r.errors, r.p50, r.p99, r.tps, 100 * r.hit_rate, r.ov50, r.ov99, r.in50, r.hit50);
	fflush(stdout);
	free(rtt);
	free(ov);
	free(in);
	free(cs);
	return r;
}

int main(int argc, char **argv)
{
	int clients = argc > 1 ? atoi(argv[1]) : 32;
	double seconds = argc > 2 ? atof(argv[2]) : 10;
	int max_tokens = argc > 3 ? atoi(argv[3]) : 32;
	if (clients < 1 || clients > 256 || !(seconds > 0) || max_tokens < 1 || max_tokens > 100) {
		fprintf(stderr, "usage: infer_bench [CLIENTS 1..256] [SECONDS] [MAX_TOKENS 1..100]\n");
		return 2;
	}
	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 1;
	}
	chmod(dir, 0711);
	struct gp_err e = { 0 };
	struct gp_stack_options o = { .data_dir = dir, .migrations_dir = GENPIPE_SOURCE_MIGRATIONS };
	pid_t kids[2] = { 0, 0 };
	int rc = 1;
	/* servers from a child, services spawned before this process starts
	 * nats.c's threads */
	if (bench_stack_up(&o, nats_url, sizeof nats_url, db_url, sizeof db_url, &e))
		goto out;
	{
		struct gp_db *db = NULL;
		struct gp_store *st = NULL;
		char uri[600], th[65], ch[65];
		snprintf(uri, sizeof uri, "file://%s/artifacts", dir);
		if (gp_db_connect(&db, db_url, 10000, &e) || gp_store_open(&st, uri, &e))
			die("connect", &e);
		struct gp_bpe_trainer *tr = NULL;
		if (gp_bpe_trainer_new(&tr, &e))
			die("tokenizer", &e);
		for (int r = 0; r < 50; r++)
			for (int i = 0; i < 8; i++)
				gp_bpe_trainer_add(tr, prompts[i], strlen(prompts[i]), &e);
		struct gp_bpe *tok = NULL;
		uint8_t *tb = NULL;
		size_t tl = 0;
		if (gp_bpe_train(tr, 400, 0, &tok, &e) || gp_bpe_save(tok, &tb, &tl, &e) ||
		    gp_store_put(st, tb, tl, th, &e))
			die("tokenizer", &e);
		gp_bpe_trainer_free(tr);
		gp_bpe_free(tok);
		free(tb);
		struct gp_model_config c = { .vocab = 4096, .padded_vocab = 4096, .context = 128,
					     .layers = 4, .heads = 4, .width = 256 };
		struct gp_model *m = NULL;
		uint8_t *img = NULL;
		size_t len = 0;
		struct gp_ckpt_meta meta = { 0 };
		if (gp_model_create(&m, &c, &e))
			die("model", &e);
		gp_model_init(m, 1);
		if (gp_ckpt_encode(m, NULL, NULL, &meta, &img, &len, &e) ||
		    gp_store_put(st, img, len, ch, &e) ||
		    gp_artifact_register(db, st, ch, "checkpoint", len, 0, NULL, NULL, &e))
			die("checkpoint", &e);
		free(img);
		gp_model_destroy(m);
		register_model(db, st, th, ch);
		gp_store_close(st);
		gp_db_destroy(db);
	}
	kids[0] = spawn_infer("bench-batched", "32", "256");
	kids[1] = spawn_infer("bench-single", "1", "256");
	/* wait until both answer */
	{
		struct gp_bus *bus = NULL;
		if (gp_bus_connect(&bus, nats_url, "bench", 0, 5000, &e))
			die("connect", &e);
		for (int i = 0; i < 2; i++) {
			const char *model = i ? "bench-single" : "bench-batched";
			char subject[128];
			snprintf(subject, sizeof subject, GP_SUBJ_INFER "%s", model);
			int ok = 0;
			for (int t = 0; t < 300 && !ok; t++) {
				gp_infer_request q = GENPIPE__V1__INFER_REQUEST__INIT;
				q.request_id = "warmup";
				q.model = (char *)model;
				q.prompt = "Love is";
				uint8_t *buf = NULL;
				size_t len = 0;
				gp_wire_encode(&q.base, &buf, &len, &e);
				natsMsg *reply = NULL;
				ok = !gp_bus_request(bus, subject, buf, (int)len, 1000, &reply, &e);
				natsMsg_Destroy(reply);
				free(buf);
				if (!ok)
					gp_sleep_ms(100);
			}
			if (!ok)
				die("the infer service does not answer", &e);
		}
		gp_bus_destroy(bus);
	}
	printf("infer_bench: demo shape (4 layers, width 256, context 128, vocab 4096), "
	       "%d new tokens a request, %g s a phase, %d clients\n", max_tokens, seconds, clients);
	printf("%-34s %6s %5s %9s %9s %10s %8s %9s %9s %9s\n", "phase", "reqs", "errs", "p50 ms",
	       "p99 ms", "tokens/s", "hits", "ovh p50", "ovh p99", "inside");
	struct result one = phase("1 client, batching service", "bench-batched", 1, seconds,
				  max_tokens);
	char label[80];
	snprintf(label, sizeof label, "%d clients, batching (32 slots)", clients);
	struct result b = phase(label, "bench-batched", clients, seconds, max_tokens);
	snprintf(label, sizeof label, "%d clients, one at a time", clients);
	struct result s = phase(label, "bench-single", clients, seconds, max_tokens);
	printf("\nbatching / one-at-a-time tokens/s with %d clients: %.2fx (goal >= 3x)\n", clients,
	       b.tps / s.tps);
	printf("service overhead p50 with 1 client: %.3f ms (goal <= 1 ms)\n", one.ov50);
	rc = 0;
out:
	if (rc)
		fprintf(stderr, "bench: %s\n", e.msg[0] ? e.msg : "failed");
	for (int i = 0; i < 2; i++)
		if (kids[i] > 0) {
			kill(kids[i], SIGTERM);
			waitpid(kids[i], NULL, 0);
		}
	gp_stack_down(dir, NULL, &e);
	if (!getenv("BENCH_KEEP")) {
		char cmd[800];
		snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
		if (system(cmd) != 0)
			fprintf(stderr, "bench: could not remove %s\n", dir);
	} else {
		printf("stack directory kept: %s\n", dir);
	}
	return rc;
}
