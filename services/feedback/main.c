/*
 * genpipe-feedback: the request log and user feedback (feedback_service.h).
 */
#include <stdio.h>

#include "feedback_service.h"
#include "log.h"
#include "service.h"
#include "triggers.h"

int main(int argc, char **argv)
{
	struct gp_service svc = { .name = "feedback" };
	struct gp_opt opts[GP_SERVICE_NOPTS + 1];
	long long judge_ms = 0;
	gp_service_options(&svc, opts);
	opts[GP_SERVICE_NOPTS] = (struct gp_opt){ "triggers-ms", "GENPIPE_FEEDBACK_TRIGGERS_MS",
						  GP_OPT_INT, "1000",
						  "how often retraining triggers are judged (0: never)",
						  &judge_ms };
	int rc = gp_service_parse("feedback", opts, GP_SERVICE_NOPTS + 1, argc, argv);
	if (rc >= 0)
		return rc;
	if (judge_ms < 0) {
		fprintf(stderr, "genpipe-feedback: --triggers-ms must be >= 0\n");
		return 2;
	}
	struct gp_err err = { 0 };
	gp_service_signals();
	if (gp_service_start(&svc, 0, 30000, &err)) {
		gp_error("could not start: %s", err.msg);
		gp_service_stop(&svc);
		return 1;
	}
	struct gp_feedback_service *s = NULL;
	rc = 0;
	if (gp_feedback_service_create(&s, svc.db, svc.bus, svc.metrics, &err)) {
		gp_error("could not start: %s", err.msg);
		rc = 1;
	}
	long long judged = 0;
	while (!rc && !gp_service_stopping()) {
		if (gp_feedback_service_poll(s, 400, &err)) {
			gp_warn("feedback: %s", err.msg);
			gp_sleep_ms(500);
		}
		if (judge_ms && gp_now_ms() - judged >= judge_ms) {
			int fired = 0;
			if (gp_triggers_judge(svc.db, &fired, &err))
				gp_warn("triggers: %s", err.msg);
			judged = gp_now_ms();
		}
	}
	gp_info("stopping");
	gp_feedback_service_destroy(s);
	gp_service_stop(&svc);
	return rc;
}
