/*
 * triggers.h: retraining triggers (the pipeline spec's `triggers`), judged
 * by genpipe-feedback.
 *
 * A trigger watches one model: its `model`, or else the model of the
 * pipeline's first deploy stage (else its first train stage). It fires
 * when one of its conditions holds, counted since it last fired:
 *   on: feedback  negative_rate x over the last `window` ratings (at least
 *                 `window` of them), or at least `min_corrections`
 *                 corrections;
 *   on: drift     an alert on `metric` (default psi) at or over
 *                 `threshold` (default: any alert on it).
 * and none of these holds: fired within `cooldown`, fired `max_per_day`
 * times in the last 24 hours, a triggered run of the pipeline still queued
 * or running. Firing is one transaction under the pipeline's row lock (the
 * conditions are read again inside it, so concurrent judges start one run
 * between them): a run of the pipeline's latest version with its default
 * params (trigger "feedback:RULE" or "drift:RULE"), a retrain_triggers row
 * with the reason and evidence, and a RetrainTrigger message on
 * genpipe.triggers.<pipeline> through the outbox. `schedule` triggers are
 * not judged here.
 */
#ifndef GP_TRIGGERS_H
#define GP_TRIGGERS_H

#include <stddef.h>

#include <cjson/cJSON.h>

#include "db.h"
#include "status.h"

struct gp_trigger_rule {
	char name[64];
	int on_drift;              /* 0: feedback */
	double negative_rate;      /* < 0: not set */
	long long window;          /* ratings; 0: not set */
	long long min_corrections; /* 0: not set */
	char metric[64];
	double threshold;          /* NAN: not set */
	long long cooldown_ms;
	long long max_per_day;     /* 0: no limit */
};

/* What the judge counted since the rule last fired. */
struct gp_trigger_facts {
	long long ratings, negatives; /* the last `window` ratings at most */
	long long corrections;
	double alert_value;           /* the largest alert on the metric; NAN: none */
	long long since_fired_ms;     /* -1: never fired */
	long long fired_24h;
	int active_run;               /* a triggered run is queued or running */
};

/* Read one trigger of a normalized spec (index i names an unnamed one). */
gp_status gp_trigger_rule_from(const cJSON *t, int i, struct gp_trigger_rule *r,
			       struct gp_err *err);

/* 1 to fire (reason says why), 0 not (reason says why not). Pure. */
int gp_trigger_decide(const struct gp_trigger_rule *r, const struct gp_trigger_facts *f,
		      char *reason, size_t rlen);

/* Judge every trigger of every pipeline's latest version; *fired counts runs started. */
gp_status gp_triggers_judge(struct gp_db *db, int *fired, struct gp_err *err);

#endif
