/*
 * genpipe feedback REQUEST_ID --rating up|down [--correction TEXT] [--json]:
 * record a rating and/or a correction of a served request (common/feedback.h),
 * straight into PostgreSQL. The request must be in the request log that
 * genpipe-feedback keeps from the telemetry stream.
 */
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "feedback.h"

int cmd_feedback(int n, char **args)
{
	const char *rating = cli_rating ? cli_rating : "";
	const char *corr = cli_correction ? cli_correction : "";
	if (n != 1 || (!*rating && !*corr)) {
		fprintf(stderr, "genpipe: feedback REQUEST_ID --rating up|down [--correction TEXT] "
				"[--json]\n");
		return 2;
	}
	enum gp_rating r = GP_RATING_NONE;
	if (!strcmp(rating, "up"))
		r = GP_RATING_UP;
	else if (!strcmp(rating, "down"))
		r = GP_RATING_DOWN;
	else if (*rating) {
		fprintf(stderr, "genpipe: --rating is \"up\" or \"down\", not \"%s\"\n", rating);
		return 2;
	}
	struct gp_db *db = cli_db();
	if (!db)
		return 1;
	const char *who = getenv("USER");
	struct passwd *pw = who ? NULL : getpwuid(getuid());
	struct gp_err err = {0};
	char model[64] = "";
	int recorded = 0;
	gp_status st = gp_feedback_record(db, args[0], r, corr, who ? who : pw ? pw->pw_name : "",
					  0, model, &recorded, &err);
	gp_db_destroy(db);
	if (st) {
		fprintf(stderr, "genpipe: feedback: %s\n", err.msg);
		return st == GP_ERR_INVALID || st == GP_ERR_TOO_BIG ? 2 : 1;
	}
	if (cli_json) {
		cJSON *o = cJSON_CreateObject();
		cJSON_AddStringToObject(o, "request_id", args[0]);
		cJSON_AddStringToObject(o, "model", model);
		if (*rating)
			cJSON_AddStringToObject(o, "rating", rating);
		cJSON_AddBoolToObject(o, "correction", *corr != 0);
		cli_print_json(o);
	} else {
		printf("feedback on %s (%s) recorded%s\n", args[0], model,
		       *corr ? ", with a correction for retraining" : "");
	}
	return 0;
}
