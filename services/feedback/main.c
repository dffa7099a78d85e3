/*
 * genpipe-feedback: the request log and user feedback (feedback_service.h).
 */
#include "feedback_service.h"
#include "log.h"
#include "service.h"

int main(int argc, char **argv)
{
	struct gp_service svc = { .name = "feedback" };
	struct gp_opt opts[GP_SERVICE_NOPTS];
	gp_service_options(&svc, opts);
	int rc = gp_service_parse("feedback", opts, GP_SERVICE_NOPTS, argc, argv);
	if (rc >= 0)
		return rc;
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
	while (!rc && !gp_service_stopping()) {
		if (gp_feedback_service_poll(s, 400, &err)) {
			gp_warn("feedback: %s", err.msg);
			gp_sleep_ms(500);
		}
	}
	gp_info("stopping");
	gp_feedback_service_destroy(s);
	gp_service_stop(&svc);
	return rc;
}
