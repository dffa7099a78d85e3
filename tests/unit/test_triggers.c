/*
 * test_triggers: reading trigger rules from a normalized spec, and the
 * decision table of gp_trigger_decide (the firing itself runs in
 * test_feedback_service).
 */
#include <math.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "../check.h"
#include "triggers.h"

int main(void)
{
	struct gp_err err = {0};
	struct gp_trigger_rule fb, dr, corr;
	cJSON *t = cJSON_Parse("{\"name\": \"unhappy\", \"on\": \"feedback\", \"negative_rate\": 0.3, "
			       "\"window\": 10, \"cooldown_ms\": 60000, \"max_per_day\": 2}");
	REQUIRE_OK(gp_trigger_rule_from(t, 0, &fb, &err), err);
	cJSON_Delete(t);
	CHECK(!fb.on_drift && fb.window == 10 && fb.cooldown_ms == 60000 && fb.max_per_day == 2);
	t = cJSON_Parse("{\"on\": \"drift\", \"metric\": \"psi\", \"threshold\": 0.25}");
	REQUIRE_OK(gp_trigger_rule_from(t, 1, &dr, &err), err);
	cJSON_Delete(t);
	CHECK(dr.on_drift && !strcmp(dr.name, "trigger-2") && dr.threshold == 0.25);
	t = cJSON_Parse("{\"on\": \"feedback\", \"min_corrections\": 3}");
	REQUIRE_OK(gp_trigger_rule_from(t, 2, &corr, &err), err);
	cJSON_Delete(t);
	t = cJSON_Parse("{\"on\": \"feedback\"}");
	CHECK(gp_trigger_rule_from(t, 3, &corr, &err) == GP_ERR_INVALID);
	CHECK_CONTAINS(err.msg, "needs negative_rate");
	cJSON_Delete(t);
	t = cJSON_Parse("{\"on\": \"schedule\", \"every_ms\": 1000}");
	CHECK(gp_trigger_rule_from(t, 4, &corr, &err) == GP_ERR_NOT_FOUND);
	cJSON_Delete(t);
	t = cJSON_Parse("{\"on\": \"feedback\", \"min_corrections\": 3}");
	REQUIRE_OK(gp_trigger_rule_from(t, 2, &corr, &err), err);
	cJSON_Delete(t);

	char why[300];
	struct gp_trigger_facts f = {.ratings = 10, .negatives = 3, .alert_value = NAN,
				     .since_fired_ms = -1};
	CHECK(gp_trigger_decide(&fb, &f, why, sizeof why) == 1);
	CHECK_CONTAINS(why, "3 of the last 10 ratings negative");
	f.negatives = 2;
	CHECK(gp_trigger_decide(&fb, &f, why, sizeof why) == 0);
	f.negatives = 5;
	f.ratings = 9; /* not yet a full window */
	CHECK(gp_trigger_decide(&fb, &f, why, sizeof why) == 0);
	f.ratings = 10;
	f.since_fired_ms = 1000; /* cooling down */
	CHECK(gp_trigger_decide(&fb, &f, why, sizeof why) == 0);
	CHECK_CONTAINS(why, "cooling down");
	f.since_fired_ms = 61000;
	f.fired_24h = 2; /* the daily maximum */
	CHECK(gp_trigger_decide(&fb, &f, why, sizeof why) == 0);
	CHECK_CONTAINS(why, "max_per_day");
	f.fired_24h = 1;
	f.active_run = 1; /* a run it started is still going: no second one */
	CHECK(gp_trigger_decide(&fb, &f, why, sizeof why) == 0);
	CHECK_CONTAINS(why, "still going");
	f.active_run = 0;
	CHECK(gp_trigger_decide(&fb, &f, why, sizeof why) == 1);

	struct gp_trigger_facts d = {.alert_value = NAN, .since_fired_ms = -1};
	CHECK(gp_trigger_decide(&dr, &d, why, sizeof why) == 0);
	d.alert_value = 0.2;
	CHECK(gp_trigger_decide(&dr, &d, why, sizeof why) == 0);
	d.alert_value = 0.3;
	CHECK(gp_trigger_decide(&dr, &d, why, sizeof why) == 1);
	CHECK_CONTAINS(why, "drift alert: psi 0.3 >= 0.25");

	struct gp_trigger_facts c = {.corrections = 2, .alert_value = NAN, .since_fired_ms = -1};
	CHECK(gp_trigger_decide(&corr, &c, why, sizeof why) == 0);
	c.corrections = 3;
	CHECK(gp_trigger_decide(&corr, &c, why, sizeof why) == 1);
	CHECK_CONTAINS(why, "3 corrections");
	return CHECK_RESULT();
}
