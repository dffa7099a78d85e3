/*
 * genpipe-feedback on real servers, with genpipe-infer answering: served
 * requests reach the request log; `genpipe feedback` records ratings and
 * corrections (a correction with its prompt, for retraining) and refuses
 * unknown request ids and bad ratings with their exit codes; Feedback
 * messages over NATS are recorded, an unknown request id is retried and
 * then dead-lettered with the reason, an undecodable message at once.
 * Retraining triggers: negative ratings over the rule start exactly one
 * run (the cool-down holds back the rest), a drift alert starts one run
 * of its own rule (its daily maximum holds back the second), each with a
 * retrain_triggers row and a RetrainTrigger message.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include "../check.h"
#include "../harness.h"

#include "artifact.h"
#include "bpe.h"
#include "model.h"
#include "registry.h"
#include "subjects.h"
#include "wire.h"

static struct gp_db *db;
static struct gp_bus *bus;
static const struct gp_test_env *ENV;

#define q(...) gp_test_q(db, __VA_ARGS__)

static int ask(const char *rid, const char *prompt)
{
	Genpipe__V1__SamplingParams sp = GENPIPE__V1__SAMPLING_PARAMS__INIT;
	sp.max_tokens = 6;
	sp.top_p = 1;
	gp_infer_request r = GENPIPE__V1__INFER_REQUEST__INIT;
	r.request_id = (char *)rid;
	r.model = "toy";
	r.prompt = (char *)prompt;
	r.sampling = &sp;
	uint8_t *b = NULL;
	size_t len = 0;
	struct gp_err e = {0};
	REQUIRE_OK(gp_wire_encode(&r.base, &b, &len, &e), e);
	natsMsg *reply = NULL;
	gp_status st = gp_bus_request(bus, GP_SUBJ_INFER "toy", b, (int)len, 5000, &reply, &e);
	free(b);
	int ok = 0;
	gp_infer_response *resp = NULL;
	if (!st && !gp_wire_decode_infer_response(&resp, (const uint8_t *)natsMsg_GetData(reply),
						  (size_t)natsMsg_GetDataLength(reply), &e)) {
		ok = !*resp->error_code;
		gp_wire_free_infer_response(resp);
	}
	natsMsg_Destroy(reply);
	return ok;
}

/* Run the CLI; its output in out, its exit status returned. */
#define cli(out, cap, ...) gp_test_cli(ENV, GENPIPE_CLI, out, cap, __VA_ARGS__)

static void publish_feedback(const char *rid, Genpipe__V1__Rating rating, const char *corr,
			     const char *msg_id)
{
	gp_feedback f = GENPIPE__V1__FEEDBACK__INIT;
	f.request_id = (char *)rid;
	f.rating = rating;
	f.correction = (char *)corr;
	f.user = "app";
	uint8_t *b = NULL;
	size_t len = 0;
	struct gp_err e = {0};
	REQUIRE_OK(gp_wire_encode(&f.base, &b, &len, &e), e);
	REQUIRE_OK(gp_bus_publish(bus, GP_SUBJ_FEEDBACK "toy", b, (int)len, msg_id, 5000, NULL, NULL,
				  &e), e);
	free(b);
}

static int body(struct gp_test_env *env)
{
	ENV = env;
	db = gp_test_db(env);
	bus = gp_test_bus(env, "test-feedback");
	struct gp_err e = {0};
	char uri[600];
	snprintf(uri, sizeof uri, "file://%s/artifacts", env->dir);
	struct gp_store *st = NULL;
	REQUIRE_OK(gp_store_open(&st, uri, &e), e);
	struct gp_bpe_trainer *tr = NULL;
	REQUIRE_OK(gp_bpe_trainer_new(&tr, &e), e);
	const char *text = "You will meet a tall dark stranger. A fool and his money. ";
	for (int i = 0; i < 20; i++)
		REQUIRE_OK(gp_bpe_trainer_add(tr, text, strlen(text), &e), e);
	struct gp_bpe *tok = NULL;
	REQUIRE_OK(gp_bpe_train(tr, 300, 0, &tok, &e), e);
	gp_bpe_trainer_free(tr);
	uint8_t *tb = NULL, *cb = NULL;
	size_t tbl = 0, cbl = 0;
	char th[65], ch[65];
	REQUIRE_OK(gp_bpe_save(tok, &tb, &tbl, &e), e);
	REQUIRE_OK(gp_store_put(st, tb, tbl, th, &e), e);
	int V = gp_bpe_vocab_size(tok);
	struct gp_model_config c = {.vocab = V, .padded_vocab = (V + 63) / 64 * 64, .context = 32,
				    .layers = 1, .heads = 2, .width = 16};
	struct gp_model *m = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &e), e);
	gp_model_init(m, 1);
	struct gp_ckpt_meta meta = {0};
	REQUIRE_OK(gp_ckpt_encode(m, NULL, NULL, &meta, &cb, &cbl, &e), e);
	REQUIRE_OK(gp_store_put(st, cb, cbl, ch, &e), e);
	REQUIRE_OK(gp_artifact_register(db, st, ch, "checkpoint", cbl, 0, NULL, NULL, &e), e);
	gp_model_destroy(m);
	char sql[1024];
	snprintf(sql, sizeof sql,
		 "INSERT INTO models (name) VALUES ('toy'); "
		 "INSERT INTO model_versions (model_id, version, artifact_id, metrics, lineage) "
		 "SELECT m.id, 1, a.id, '{}', '{\"tokenizer\": \"sha256:%s\"}' FROM models m, "
		 "artifacts a WHERE m.name = 'toy' AND a.content_hash = '%s'", th, ch);
	REQUIRE_OK(gp_db_run(db, "register", sql, &e), e);
	REQUIRE_OK(gp_registry_move_alias(db, "toy", "production", 1, "test", NULL, NULL, &e), e);
	gp_test_service(env, "genpipe-infer", "--data-dir", env->dir, "--model", "toy", NULL);
	gp_test_service(env, "genpipe-feedback", "--triggers-ms", "200", NULL);
	gp_test_service(env, "genpipe-orchestrator", "--sweep-ms", "200", NULL);
	gp_test_service(env, "genpipe-noop", NULL);

	int ok = 0;
	for (int i = 0; i < 100 && !ok; i++)
		if (!(ok = ask("fb-warmup", "You will")))
			gp_sleep_ms(100);
	REQUIRE(ok);
	CHECK(ask("fb-1", "A fool and"));
	CHECK(ask("fb-2", "You will meet"));
	CHECK(ask("fb-3", "A tall dark"));
	for (int i = 0; i < 100 && q("SELECT count(*) FROM inference_events WHERE request_id LIKE "
				     "'fb-_'") < 3; i++)
		gp_sleep_ms(100);
	CHECK(q("SELECT count(*) FROM inference_events WHERE request_id LIKE 'fb-_' AND model = "
		"'toy' AND version = 1 AND model_version_id IS NOT NULL AND prompt IS NOT NULL AND "
		"cardinality(prompt_ids) > 0 AND served_at IS NOT NULL") == 3);

	/* the CLI */
	char out[4096];
	CHECK(cli(out, sizeof out, "feedback fb-1 --rating up") == 0);
	CHECK_CONTAINS(out, "feedback on fb-1 (toy) recorded");
	CHECK(cli(out, sizeof out, "feedback fb-2 --rating down --correction 'a tall dark stranger'")
	      == 0);
	CHECK_CONTAINS(out, "with a correction");
	CHECK(q("SELECT count(*) FROM feedback WHERE request_id = 'fb-1' AND rating = 'up' AND "
		"model = 'toy' AND model_version_id IS NOT NULL") == 1);
	CHECK(q("SELECT count(*) FROM feedback_corrections WHERE request_id = 'fb-2' AND model = "
		"'toy' AND prompt = 'You will meet' AND correction = 'a tall dark stranger'") == 1);
	CHECK(cli(out, sizeof out, "feedback nope-42 --rating down") == 1);
	CHECK_CONTAINS(out, "no request \"nope-42\" in the request log");
	CHECK(cli(out, sizeof out, "feedback fb-1 --rating sideways") == 2);
	CHECK_CONTAINS(out, "--rating is \"up\" or \"down\"");
	CHECK(cli(out, sizeof out, "feedback fb-1") == 2);

	/* over NATS */
	publish_feedback("fb-3", GENPIPE__V1__RATING__RATING_DOWN, "a fool and his money", "m-1");
	publish_feedback("never-served", GENPIPE__V1__RATING__RATING_DOWN, "", "m-2");
	struct gp_err e2 = {0};
	CHECK(gp_bus_publish(bus, GP_SUBJ_FEEDBACK "toy", "\x0a\xff\xff", 3, "m-3", 5000, NULL, NULL,
			     &e2) == GP_OK);
	for (int i = 0; i < 150 && q("SELECT count(*) FROM dead_letters") < 2; i++)
		gp_sleep_ms(100);
	CHECK(q("SELECT count(*) FROM feedback WHERE request_id = 'fb-3' AND rating = 'down' AND "
		"author = 'app' AND stream_seq IS NOT NULL") == 1);
	CHECK(q("SELECT count(*) FROM feedback_corrections WHERE request_id = 'fb-3'") == 1);
	CHECK(q("SELECT count(*) FROM feedback WHERE request_id = 'never-served'") == 0);
	char *why = gp_test_qs(db, "SELECT string_agg(reason, ' | ' ORDER BY id) FROM dead_letters");
	printf("dead letters: %s\n", why ? why : "-");
	CHECK_CONTAINS(why ? why : "", "no request \"never-served\"");
	CHECK_CONTAINS(why ? why : "", "feedback");
	free(why);
	CHECK(q("SELECT count(*) FROM dead_letters") == 2);

	/* retraining triggers */
	const char *yaml =
		"apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: retrain-toy}\nspec:\n"
		"  stages:\n    - {name: retrain, kind: noop}\n"
		"  triggers:\n"
		"    - {name: unhappy, on: feedback, model: toy, negative_rate: 0.5, window: 4, "
		"cooldown: 1h}\n"
		"    - {name: drifted, on: drift, model: toy, metric: psi, threshold: 0.25, "
		"max_per_day: 1}\n";
	long long first = gp_test_submit(db, yaml, NULL, 0);
	REQUIRE(gp_test_wait_run(db, first, 30000) == 1);
	gp_sleep_ms(600);
	/* three ratings so far (up, down, down): under the window of four */
	CHECK(q("SELECT count(*) FROM retrain_triggers") == 0);
	CHECK(ask("fb-4", "A fool"));
	CHECK(ask("fb-5", "You will"));
	for (int i = 0; i < 100 && q("SELECT count(*) FROM inference_events WHERE request_id IN "
				     "('fb-4', 'fb-5')") < 2; i++)
		gp_sleep_ms(100);
	CHECK(cli(out, sizeof out, "feedback fb-4 --rating down") == 0);
	CHECK(cli(out, sizeof out, "feedback fb-5 --rating down") == 0);
	for (int i = 0; i < 100 && q("SELECT count(*) FROM retrain_triggers") < 1; i++)
		gp_sleep_ms(100);
	CHECK(q("SELECT count(*) FROM retrain_triggers WHERE rule = 'unhappy' AND run_id IS NOT "
		"NULL") == 1);
	char *reason = gp_test_qs(db, "SELECT reason FROM retrain_triggers WHERE rule = 'unhappy'");
	printf("unhappy fired: %s\n", reason ? reason : "-");
	CHECK_CONTAINS(reason ? reason : "", "of the last 4 ratings negative");
	free(reason);
	long long trun = q("SELECT run_id FROM retrain_triggers WHERE rule = 'unhappy'");
	CHECK(gp_test_wait_run(db, trun, 30000) == 1);
	CHECK(q("SELECT count(*) FROM runs WHERE trigger = 'feedback:unhappy'") == 1);
	/* more unhappy users within the cool-down: nothing more */
	CHECK(cli(out, sizeof out, "feedback fb-1 --rating down") == 0);
	CHECK(cli(out, sizeof out, "feedback fb-2 --rating down") == 0);
	gp_sleep_ms(1500);
	CHECK(q("SELECT count(*) FROM runs WHERE trigger = 'feedback:unhappy'") == 1);
	/* a drift alert fires its own rule once a day */
	REQUIRE_OK(gp_db_run(db, "alert",
			     "INSERT INTO alerts (model_version_id, metric, value, threshold, severity, "
			     "message) SELECT v.id, 'psi', 0.4, 0.2, 'warning', 'test' FROM "
			     "model_versions v JOIN models m ON m.id = v.model_id WHERE m.name = 'toy'",
			     &e), e);
	for (int i = 0; i < 100 && q("SELECT count(*) FROM runs WHERE trigger = 'drift:drifted'") < 1;
	     i++)
		gp_sleep_ms(100);
	CHECK(q("SELECT count(*) FROM runs WHERE trigger = 'drift:drifted'") == 1);
	long long drun = q("SELECT run_id FROM retrain_triggers WHERE rule = 'drifted'");
	CHECK(gp_test_wait_run(db, drun, 30000) == 1);
	REQUIRE_OK(gp_db_run(db, "alert again",
			     "INSERT INTO alerts (model_version_id, metric, value, threshold, severity, "
			     "message) SELECT v.id, 'psi', 0.5, 0.2, 'warning', 'test' FROM "
			     "model_versions v JOIN models m ON m.id = v.model_id WHERE m.name = 'toy'",
			     &e), e);
	gp_sleep_ms(1500);
	CHECK(q("SELECT count(*) FROM runs WHERE trigger = 'drift:drifted'") == 1);
	/* the messages, through the outbox */
	struct gp_consumer_def cd = {GP_STREAM_CONTROL, "test-triggers", GP_SUBJ_TRIGGERS "retrain-toy",
				     30000, -1, 100};
	REQUIRE_OK(gp_bus_declare(bus, NULL, 0, &cd, 1, &e), e);
	natsSubscription *tsub = NULL;
	REQUIRE_OK(gp_bus_pull_subscribe(bus, &cd, &tsub, &e), e);
	int unhappy = 0, drifted = 0;
	for (int tries = 0; tries < 10 && unhappy + drifted < 2; tries++) {
		natsMsgList list = {0};
		if (gp_bus_fetch(tsub, 16, 500, &list, &e))
			continue;
		for (int i = 0; i < list.Count; i++) {
			gp_retrain_trigger *rt = NULL;
			if (!gp_wire_decode_retrain_trigger(
				    &rt, (const uint8_t *)natsMsg_GetData(list.Msgs[i]),
				    (size_t)natsMsg_GetDataLength(list.Msgs[i]), &e)) {
				unhappy += !strcmp(rt->rule, "unhappy") && !strcmp(rt->model, "toy");
				drifted += !strcmp(rt->rule, "drifted");
				gp_wire_free_retrain_trigger(rt);
			}
			gp_bus_ack(list.Msgs[i], &e);
		}
		natsMsgList_Destroy(&list);
	}
	natsSubscription_Destroy(tsub);
	CHECK(unhappy == 1 && drifted == 1);
	free(tb);
	free(cb);
	gp_bpe_free(tok);
	gp_store_close(st);
	gp_bus_destroy(bus);
	gp_db_destroy(db);
	return CHECK_RESULT();
}

int main(void)
{
	return gp_test_run(body);
}
