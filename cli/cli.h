/*
 * cli.h: what the genpipe command's files share: the parsed options and the
 * helpers that find the servers.
 *
 * Server addresses: --database-url / --nats-url (or GENPIPE_DATABASE_URL /
 * GENPIPE_NATS_URL); without them, the local stack's DIR/env written by
 * `genpipe dev up`.
 */
#ifndef GP_CLI_H
#define GP_CLI_H

#include <cjson/cJSON.h>
#include <stdio.h>

#include "bus.h"
#include "config.h"
#include "db.h"

extern const char *cli_data_dir;  /* absolute */
extern const char *cli_database_url;
extern const char *cli_nats_url;
extern int cli_json;
extern int cli_no_run;
extern long long cli_limit;
extern const char *cli_pipeline;
extern struct gp_opt_list cli_params;
extern long long cli_timeout_ms;
extern const char *cli_format;    /* models export */
extern const char *cli_artifacts; /* store URI; empty: DATA_DIR/artifacts */

/* Connect or print the reason and return NULL. */
struct cli_infer_opts {
	const char *prompt, *alias, *temperature, *top_p, *seed;
	long long version, max_tokens, top_k, deadline_ms;
	struct gp_opt_list stop;
	int stream;
};
extern struct cli_infer_opts cli_infer;
extern const char *cli_since;   /* drift */
extern const char *cli_rating, *cli_correction; /* feedback */

struct gp_db *cli_db(void);
struct gp_bus *cli_bus(void);

/* Print JSON (pretty) and free it. */
void cli_print_json(cJSON *j);

/* Parse a spec file; print errors as FILE:LINE:COL. 0 ok, 1 unreadable, 2 invalid. */
int cli_load_spec(const char *path, char **text, cJSON **doc);

int cmd_submit(int n, char **args);
int cmd_pipelines(int n, char **args);
int cmd_runs(int n, char **args);
int cmd_models(int n, char **args);
int cmd_infer(int n, char **args);
int cmd_telemetry(int n, char **args);
int cmd_drift(int n, char **args);
int cmd_feedback(int n, char **args);

#endif
