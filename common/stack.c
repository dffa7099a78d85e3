/*
 * stack.c: start and stop nats-server, PostgreSQL and the services under a
 * data directory (see stack.h).
 *
 * Children are started with fork+exec, in their own session (setsid) so a
 * terminal's Ctrl-C does not reach them, with stdin from /dev/null and
 * stdout/stderr appended to their log. We keep no supervisor process: the
 * pid files are the state, and every command re-reads them.
 */
#include "stack.h"
#include "file.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <grp.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bus.h"
#include "db.h"
#include "http.h"

#define PATHMAX 4096

static void say(FILE *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(FILE *f, const char *fmt, ...)
{
	if (!f)
		return;
	va_list ap;
	va_start(ap, fmt);
	vfprintf(f, fmt, ap);
	va_end(ap);
	fflush(f);
}

int gp_stack_free_port(void)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return -1;
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = 0 };
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	socklen_t sl = sizeof sa;
	int port = -1;
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0 &&
	    getsockname(fd, (struct sockaddr *)&sa, &sl) == 0)
		port = ntohs(sa.sin_port);
	close(fd);
	return port;
}

/* 1 when nothing listens on 127.0.0.1:port and we may bind it. */
static int port_free(int port)
{
	if (port <= 0)
		return 0;
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return 0;
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	int ok = bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
	close(fd);
	return ok;
}

/* Keep a component's port across restarts (clients' URLs stay valid). */
static int reuse_or_pick(int recorded)
{
	return port_free(recorded) ? recorded : gp_stack_free_port();
}

static int read_small(const char *path, char *out, size_t len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, out, len - 1);
	close(fd);
	if (n < 0)
		return -1;
	out[n] = '\0';
	while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == ' '))
		out[--n] = '\0';
	return (int)n;
}

static int read_int(const char *path)
{
	char b[32];
	if (read_small(path, b, sizeof b) <= 0)
		return 0;
	return atoi(b);
}

void gp_stack_log_path(const char *dir, const char *name, char *out, size_t len)
{
	snprintf(out, len, "%s/logs/%s.log", dir, name);
}

/* The program a pid runs, from /proc/PID/cmdline's first word (basename). */
static int pid_runs(int pid, const char *prog)
{
	if (pid <= 0 || kill(pid, 0) != 0)
		return 0;
	char path[64], cmd[1024];
	snprintf(path, sizeof path, "/proc/%d/cmdline", pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, cmd, sizeof cmd - 1);
	close(fd);
	if (n <= 0)
		return 0;
	cmd[n] = '\0';
	const char *base = strrchr(cmd, '/');
	base = base ? base + 1 : cmd;
	/* A zombie child has an empty cmdline and was handled by n <= 0. */
	return strcmp(base, prog) == 0;
}

/* Who runs PostgreSQL: ourselves, or an unprivileged user when we are root. */
struct runas {
	int set;
	uid_t uid;
	gid_t gid;
	char name[64];
};

static void runas_pick(struct runas *ra)
{
	memset(ra, 0, sizeof *ra);
	if (geteuid() != 0)
		return;
	const char *names[] = { "postgres", "nobody" };
	for (int i = 0; i < 2; i++) {
		struct passwd *pw = getpwnam(names[i]);
		if (pw) {
			ra->set = 1;
			ra->uid = pw->pw_uid;
			ra->gid = pw->pw_gid;
			snprintf(ra->name, sizeof ra->name, "%s", names[i]);
			return;
		}
	}
}

static int chown_tree(const char *path, const struct runas *ra)
{
	if (!ra->set)
		return 0;
	if (lchown(path, ra->uid, ra->gid) != 0)
		return -1;
	struct stat sb;
	if (lstat(path, &sb) != 0 || !S_ISDIR(sb.st_mode))
		return 0;
	DIR *d = opendir(path);
	if (!d)
		return -1;
	struct dirent *e;
	int rc = 0;
	while ((e = readdir(d)) != NULL) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		char sub[PATHMAX];
		snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
		if (chown_tree(sub, ra) != 0)
			rc = -1;
	}
	closedir(d);
	return rc;
}

/*
 * fork+exec argv with output to logpath. wait_exit: wait and return the exit
 * status in *status; otherwise return at once with the child's pid in *pid.
 */
static gp_status spawn(char *const argv[], char *const envp_extra[], const char *logpath,
		       const struct runas *ra, int wait_exit, int *pid, int *status,
		       int die_with_parent, struct gp_err *err)
{
	int logfd = open(logpath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
	if (logfd < 0)
		return gp_err_set(err, GP_ERR_IO, "could not open log \"%s\": %s", logpath,
				  strerror(errno));
	if (ra && ra->set)
		(void)fchown(logfd, ra->uid, ra->gid);
	int errpipe[2];
	if (pipe2(errpipe, O_CLOEXEC) != 0) {
		close(logfd);
		return gp_err_set(err, GP_ERR_IO, "pipe: %s", strerror(errno));
	}
	pid_t c = fork();
	if (c < 0) {
		close(logfd);
		close(errpipe[0]);
		close(errpipe[1]);
		return gp_err_set(err, GP_ERR_IO, "fork: %s", strerror(errno));
	}
	if (c == 0) {
		int e = 0;
		if (die_with_parent)
			prctl(PR_SET_PDEATHSIG, SIGKILL);
		else
			setsid();
		int nullfd = open("/dev/null", O_RDONLY);
		if (nullfd >= 0)
			dup2(nullfd, 0);
		dup2(logfd, 1);
		dup2(logfd, 2);
		for (int i = 0; envp_extra && envp_extra[i]; i++)
			putenv(envp_extra[i]);
		if (ra && ra->set) {
			if (setgroups(0, NULL) != 0 || setgid(ra->gid) != 0 || setuid(ra->uid) != 0)
				e = errno;
			if (!e) {
				struct passwd *pw = getpwuid(ra->uid);
				if (pw) {
					setenv("HOME", pw->pw_dir, 1);
					setenv("USER", pw->pw_name, 1);
				}
			}
		}
		if (!e) {
			execv(argv[0], argv);
			e = errno;
		}
		ssize_t w = write(errpipe[1], &e, sizeof e);
		(void)w;
		_exit(127);
	}
	close(logfd);
	close(errpipe[1]);
	int e = 0;
	ssize_t n = read(errpipe[0], &e, sizeof e);
	close(errpipe[0]);
	if (n == (ssize_t)sizeof e) {
		waitpid(c, NULL, 0);
		return gp_err_set(err, GP_ERR_IO, "could not run %s: %s", argv[0], strerror(e));
	}
	if (!wait_exit) {
		*pid = c;
		return GP_OK;
	}
	int ws = 0;
	while (waitpid(c, &ws, 0) < 0 && errno == EINTR)
		;
	*status = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
	return GP_OK;
}

gp_status gp_stack_spawn(char *const argv[], char *const env[], const char *logpath,
			 int die_with_parent, int *pid, struct gp_err *err)
{
	return spawn(argv, env, logpath, NULL, 0, pid, NULL, die_with_parent, err);
}

static int file_exists(const char *p)
{
	return access(p, F_OK) == 0;
}

static gp_status find_nats_server(char *out, size_t len, struct gp_err *err)
{
	const char *env = getenv("GENPIPE_NATS_SERVER");
	if (env && *env) {
		snprintf(out, len, "%s", env);
		return GP_OK;
	}
	const char *path = getenv("PATH");
	char buf[PATHMAX];
	snprintf(buf, sizeof buf, "%s:/usr/sbin:/usr/local/sbin:/usr/local/bin:/usr/bin",
		 path ? path : "");
	for (char *save, *d = strtok_r(buf, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
		snprintf(out, len, "%s/nats-server", d);
		if (access(out, X_OK) == 0)
			return GP_OK;
	}
	return gp_err_set(err, GP_ERR_NOT_FOUND,
			  "nats-server not found (apt-get install nats-server, or set "
			  "GENPIPE_NATS_SERVER)");
}

static gp_status find_pg_bindir(char *out, size_t len, struct gp_err *err)
{
	const char *env = getenv("GENPIPE_PG_BINDIR");
	if (env && *env) {
		snprintf(out, len, "%s", env);
		return GP_OK;
	}
	glob_t g;
	if (glob("/usr/lib/postgresql/*/bin/postgres", 0, NULL, &g) == 0 && g.gl_pathc > 0) {
		/* Highest major version: compare numerically. */
		int best = -1, bestv = -1;
		for (size_t i = 0; i < g.gl_pathc; i++) {
			int v = atoi(g.gl_pathv[i] + strlen("/usr/lib/postgresql/"));
			if (v > bestv) {
				bestv = v;
				best = (int)i;
			}
		}
		snprintf(out, len, "%s", g.gl_pathv[best]);
		*strrchr(out, '/') = '\0';
		globfree(&g);
		return GP_OK;
	}
	globfree(&g);
	return gp_err_set(err, GP_ERR_NOT_FOUND,
			  "PostgreSQL server binaries not found under /usr/lib/postgresql "
			  "(apt-get install postgresql, or set GENPIPE_PG_BINDIR)");
}

static gp_status write_pid(const char *dir, const char *name, int pid, int port,
			   struct gp_err *err)
{
	char path[PATHMAX], v[32];
	gp_status st;
	snprintf(path, sizeof path, "%s/run/%s.pid", dir, name);
	snprintf(v, sizeof v, "%d\n", pid);
	if ((st = gp_file_write_atomic(path, v, strlen(v), 0644, err)))
		return st;
	snprintf(path, sizeof path, "%s/run/%s.port", dir, name);
	snprintf(v, sizeof v, "%d\n", port);
	return gp_file_write_atomic(path, v, strlen(v), 0644, err);
}

static int recorded_pid(const char *dir, const char *name)
{
	char path[PATHMAX];
	snprintf(path, sizeof path, "%s/run/%s.pid", dir, name);
	return read_int(path);
}

static int recorded_port(const char *dir, const char *name)
{
	char path[PATHMAX];
	snprintf(path, sizeof path, "%s/run/%s.port", dir, name);
	return read_int(path);
}

static int tcp_open(int port)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return 0;
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	int ok = connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
	close(fd);
	return ok;
}

/* Wait for a child to open its port; fail early if it exits. */
static gp_status wait_port(const char *name, int pid, int port, const char *logpath,
			   long long ms, struct gp_err *err)
{
	long long deadline = gp_now_ms() + ms;
	while (gp_now_ms() < deadline) {
		if (tcp_open(port))
			return GP_OK;
		int ws;
		if (waitpid(pid, &ws, WNOHANG) == pid || kill(pid, 0) != 0)
			return gp_err_set(err, GP_ERR_UNAVAILABLE, "%s exited during start; see %s",
					  name, logpath);
		gp_sleep_ms(50);
	}
	return gp_err_set(err, GP_ERR_TIMEOUT, "%s did not open port %d within %lld ms; see %s",
			  name, port, ms, logpath);
}

static gp_status nats_up(const struct gp_stack_options *o, char *url, size_t ulen,
			 struct gp_err *err)
{
	const char *dir = o->data_dir;
	int pid = recorded_pid(dir, "nats");
	int port = recorded_port(dir, "nats");
	if (pid_runs(pid, "nats-server") && port > 0 && tcp_open(port)) {
		say(o->progress, "nats-server already running (pid %d, port %d)\n", pid, port);
		snprintf(url, ulen, "nats://127.0.0.1:%d", port);
		return GP_OK;
	}
	char bin[PATHMAX], conf[PATHMAX], store[PATHMAX], logp[PATHMAX], text[2 * PATHMAX];
	gp_status st;
	if ((st = find_nats_server(bin, sizeof bin, err)))
		return st;
	snprintf(store, sizeof store, "%s/nats/jetstream", dir);
	if ((st = gp_file_mkdirs(store, 0700, err)))
		return st;
	port = reuse_or_pick(port);
	char mpath[PATHMAX];
	snprintf(mpath, sizeof mpath, "%s/run/nats-monitor.port", dir);
	int mport = reuse_or_pick(read_int(mpath));
	if (port < 0 || mport < 0)
		return gp_err_set(err, GP_ERR_IO, "could not find a free port: %s", strerror(errno));
	snprintf(conf, sizeof conf, "%s/nats/nats.conf", dir);
	snprintf(text, sizeof text,
		 "# written by genpipe dev up; rewritten on every start\n"
		 "listen: 127.0.0.1:%d\n"
		 "http: 127.0.0.1:%d\n"
		 "server_name: genpipe-local\n"
		 "max_payload: 2MB\n"
		 "jetstream {\n  store_dir: \"%s\"\n  max_memory_store: 256MB\n"
		 "  max_file_store: %s\n}\n",
		 port, mport, store, "16GB");
	if ((st = gp_file_write_atomic(conf, text, strlen(text), 0644, err)))
		return st;
	gp_stack_log_path(dir, "nats", logp, sizeof logp);
	char *argv[] = { bin, "-c", conf, NULL };
	if ((st = spawn(argv, NULL, logp, NULL, 0, &pid, NULL, 0, err)))
		return st;
	if ((st = write_pid(dir, "nats", pid, port, err)))
		return st;
	char mp[32];
	snprintf(mp, sizeof mp, "%d\n", mport);
	snprintf(conf, sizeof conf, "%s/run/nats-monitor.port", dir);
	if ((st = gp_file_write_atomic(conf, mp, strlen(mp), 0644, err)))
		return st;
	if ((st = wait_port("nats-server", pid, port, logp, 15000, err)))
		return st;
	say(o->progress, "nats-server started (pid %d, port %d, JetStream store %s)\n", pid, port,
	    store);
	snprintf(url, ulen, "nats://127.0.0.1:%d", port);
	return GP_OK;
}

/* Can ra's user reach (search) path? Checked in a child that drops privileges. */
static int user_can_reach(const struct runas *ra, const char *path)
{
	if (!ra->set)
		return 1;
	pid_t c = fork();
	if (c == 0) {
		if (setgroups(0, NULL) != 0 || setgid(ra->gid) != 0 || setuid(ra->uid) != 0)
			_exit(2);
		_exit(access(path, X_OK) == 0 ? 0 : 1);
	}
	int ws = 0;
	waitpid(c, &ws, 0);
	return WIFEXITED(ws) && WEXITSTATUS(ws) == 0;
}

static gp_status pg_up(const struct gp_stack_options *o, char *url, size_t ulen,
		       struct gp_err *err)
{
	const char *dir = o->data_dir;
	char bindir[PATHMAX], pgdir[PATHMAX], data[PATHMAX], sock[PATHMAX], pwpath[PATHMAX],
		logp[PATHMAX], path[PATHMAX + 64], pw[128];
	gp_status st;
	struct runas ra;
	runas_pick(&ra);
	snprintf(pgdir, sizeof pgdir, "%s/pg", dir);
	snprintf(data, sizeof data, "%s/pg/data", dir);
	snprintf(sock, sizeof sock, "%s/pg/sock", dir);
	snprintf(pwpath, sizeof pwpath, "%s/pg/password", dir);
	gp_stack_log_path(dir, "postgres", logp, sizeof logp);

	int tries = 0;
again:;
	int pid = recorded_pid(dir, "postgres");
	int port = recorded_port(dir, "postgres");
	/* A recorded server that is alive but not accepting is starting up or
	 * shutting down: wait for it to settle either way before deciding. */
	long long settle = gp_now_ms() + 30000;
	while (pid_runs(pid, "postgres") && !(port > 0 && tcp_open(port)) && gp_now_ms() < settle)
		gp_sleep_ms(100);
	int running = pid_runs(pid, "postgres") && port > 0 && tcp_open(port);

	if ((st = find_pg_bindir(bindir, sizeof bindir, err)))
		return st;
	if ((st = gp_file_mkdirs(sock, 0700, err)))
		return st;
	if (!running) {
		snprintf(path, sizeof path, "%s/PG_VERSION", data);
		if (!file_exists(path)) {
			/* First start: generate a password and initdb. */
			unsigned char rnd[18];
			if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd)
				return gp_err_set(err, GP_ERR_IO, "getrandom: %s", strerror(errno));
			for (size_t i = 0; i < sizeof rnd; i++)
				sprintf(pw + 2 * i, "%02x", rnd[i]);
			char pwline[160];
			snprintf(pwline, sizeof pwline, "%s\n", pw);
			if ((st = gp_file_write_atomic(pwpath, pwline, strlen(pwline), 0600, err)))
				return st;
			char initpw[PATHMAX];
			snprintf(initpw, sizeof initpw, "%s/initdb.pw", pgdir);
			if ((st = gp_file_write_atomic(initpw, pwline, strlen(pwline), 0600, err)))
				return st;
			if (ra.set && (chown(pgdir, ra.uid, ra.gid) != 0 ||
				       chown(sock, ra.uid, ra.gid) != 0 ||
				       chown(initpw, ra.uid, ra.gid) != 0))
				return gp_err_set(err, GP_ERR_IO, "could not chown \"%s\" to %s: %s",
						  pgdir, ra.name, strerror(errno));
			if (!user_can_reach(&ra, pgdir))
				return gp_err_set(err, GP_ERR_INVALID,
						  "PostgreSQL runs as user %s (we are root), who "
						  "cannot reach \"%s\"; use a data directory whose "
						  "parents are world-searchable",
						  ra.name, pgdir);
			char initdb[PATHMAX + 16], pwopt[PATHMAX + 16];
			snprintf(initdb, sizeof initdb, "%s/initdb", bindir);
			snprintf(pwopt, sizeof pwopt, "--pwfile=%s", initpw);
			char *argv[] = { initdb, "-D", data, "-U", "genpipe", pwopt,
					 "--auth-host=scram-sha-256", "--auth-local=scram-sha-256",
					 "-E", "UTF8", "--locale=C", "--no-instructions",
					 o->fast ? "--no-sync" : NULL, NULL };
			say(o->progress, "initdb %s (as %s)\n", data, ra.set ? ra.name : "current user");
			int rc = 0;
			st = spawn(argv, NULL, logp, &ra, 1, NULL, &rc, 0, err);
			unlink(initpw);
			if (st)
				return st;
			if (rc != 0)
				return gp_err_set(err, GP_ERR_IO, "initdb failed (exit %d); see %s", rc,
						  logp);
		}
		if (ra.set)
			chown_tree(pgdir, &ra);
		port = reuse_or_pick(port);
		char portopt[32], sockopt[PATHMAX + 32], pgbin[PATHMAX + 16];
		snprintf(pgbin, sizeof pgbin, "%s/postgres", bindir);
		snprintf(portopt, sizeof portopt, "port=%d", port);
		snprintf(sockopt, sizeof sockopt, "unix_socket_directories=%s", sock);
		char *argv[] = { pgbin, "-D", data, "-c", "listen_addresses=127.0.0.1", "-c", portopt,
				 "-c", sockopt, "-c", o->fast ? "fsync=off" : "fsync=on",
				 "-c", o->fast ? "synchronous_commit=off" : "synchronous_commit=on",
				 "-c", "max_connections=200", "-c", "logging_collector=off", NULL };
		if ((st = spawn(argv, NULL, logp, &ra, 0, &pid, NULL, 0, err)))
			return st;
		if ((st = write_pid(dir, "postgres", pid, port, err)))
			return st;
		if ((st = wait_port("postgres", pid, port, logp, 30000, err)))
			return st;
		say(o->progress, "postgres started (pid %d, port %d, data %s)\n", pid, port, data);
	} else {
		say(o->progress, "postgres already running (pid %d, port %d)\n", pid, port);
	}
	if (read_small(pwpath, pw, sizeof pw) <= 0)
		return gp_err_set(err, GP_ERR_IO, "could not read the cluster password \"%s\"",
				  pwpath);
	/* Create the genpipe database once; the server may still be starting. */
	char adminurl[512];
	snprintf(adminurl, sizeof adminurl,
		 "postgresql://genpipe:%s@127.0.0.1:%d/postgres?connect_timeout=5", pw, port);
	struct gp_db *db = NULL;
	long long until = gp_now_ms() + 30000;
	while ((st = gp_db_connect(&db, adminurl, 1000, err))) {
		/* It was shutting down when we looked: start it again. */
		if (!pid_runs(pid, "postgres") && ++tries < 3)
			goto again;
		if (gp_now_ms() > until)
			return st;
	}
	PGresult *r = NULL;
	st = gp_db_exec(db, "look for database genpipe",
			"SELECT 1 FROM pg_database WHERE datname = 'genpipe'", 0, NULL, &r, err);
	if (!st && PQntuples(r) == 0) {
		st = gp_db_run(db, "create database genpipe", "CREATE DATABASE genpipe", err);
		if (st == GP_ERR_EXISTS || (st == GP_ERR_DB && strstr(err->msg, "already exists")))
			st = GP_OK;
	}
	PQclear(r);
	gp_db_destroy(db);
	if (st)
		return st;
	snprintf(url, ulen, "postgresql://genpipe:%s@127.0.0.1:%d/genpipe", pw, port);
	return GP_OK;
}

static gp_status services_up(const struct gp_stack_options *o, const char *nats_url,
			     const char *db_url, struct gp_err *err)
{
	if (!o->bin_dir)
		return GP_OK;
	char pat[PATHMAX];
	snprintf(pat, sizeof pat, "%s/genpipe-*", o->bin_dir);
	glob_t g;
	int gr = glob(pat, 0, NULL, &g);
	if (gr == GLOB_NOMATCH)
		return GP_OK;
	if (gr != 0)
		return gp_err_set(err, GP_ERR_IO, "could not list services in \"%s\"", o->bin_dir);
	gp_status st = GP_OK;
	for (size_t i = 0; i < g.gl_pathc && !st; i++) {
		const char *bin = g.gl_pathv[i];
		if (access(bin, X_OK) != 0)
			continue;
		const char *base = strrchr(bin, '/') + 1;
		const char *name = base + strlen("genpipe-");
		int pid = recorded_pid(o->data_dir, name);
		if (pid_runs(pid, base)) {
			say(o->progress, "%s already running (pid %d)\n", base, pid);
			continue;
		}
		int port = gp_stack_free_port();
		char e1[512], e2[512], e3[64], e4[PATHMAX + 32], logp[PATHMAX];
		snprintf(e1, sizeof e1, "GENPIPE_NATS_URL=%s", nats_url);
		snprintf(e2, sizeof e2, "GENPIPE_DATABASE_URL=%s", db_url);
		snprintf(e3, sizeof e3, "GENPIPE_HTTP_PORT=%d", port);
		snprintf(e4, sizeof e4, "GENPIPE_DATA_DIR=%s", o->data_dir);
		char *envx[] = { e1, e2, e3, e4, NULL };
		char *argv[] = { (char *)bin, NULL };
		gp_stack_log_path(o->data_dir, name, logp, sizeof logp);
		if ((st = spawn(argv, envx, logp, NULL, 0, &pid, NULL, 0, err)))
			break;
		if ((st = write_pid(o->data_dir, name, pid, port, err)))
			break;
		if ((st = wait_port(base, pid, port, logp, 15000, err)))
			break;
		say(o->progress, "%s started (pid %d, http port %d)\n", base, pid, port);
	}
	globfree(&g);
	return st;
}

static gp_status lock_dir(const char *dir, int *fd, struct gp_err *err)
{
	char path[PATHMAX];
	snprintf(path, sizeof path, "%s/run/lock", dir);
	*fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (*fd < 0)
		return gp_err_set(err, GP_ERR_IO, "could not open \"%s\": %s", path, strerror(errno));
	if (flock(*fd, LOCK_EX) != 0) {
		close(*fd);
		return gp_err_set(err, GP_ERR_IO, "could not lock \"%s\": %s", path, strerror(errno));
	}
	return GP_OK;
}

gp_status gp_stack_up(const struct gp_stack_options *o, struct gp_err *err)
{
	char path[PATHMAX], nats_url[128], db_url[512], env[2048];
	gp_status st;
	int lockfd = -1;
	snprintf(path, sizeof path, "%s/run", o->data_dir);
	if ((st = gp_file_mkdirs(path, 0755, err)))
		return st;
	snprintf(path, sizeof path, "%s/logs", o->data_dir);
	if ((st = gp_file_mkdirs(path, 0755, err)))
		return st;
	if ((st = lock_dir(o->data_dir, &lockfd, err)))
		return st;
	if ((st = nats_up(o, nats_url, sizeof nats_url, err)))
		goto out;
	if ((st = pg_up(o, db_url, sizeof db_url, err)))
		goto out;

	struct gp_db *db = NULL;
	int applied = 0, total = 0;
	if ((st = gp_db_connect(&db, db_url, 30000, err)))
		goto out;
	st = gp_db_migrate(db, o->migrations_dir, &applied, &total, err);
	gp_db_destroy(db);
	if (st)
		goto out;
	say(o->progress, "migrations: %d applied now, %d in total\n", applied, total);

	struct gp_bus *bus = NULL;
	int ns;
	const struct gp_stream_def *streams = gp_bus_default_streams(&ns);
	if ((st = gp_bus_connect(&bus, nats_url, "genpipe-dev", 0, 15000, err)))
		goto out;
	st = gp_bus_declare(bus, streams, ns, NULL, 0, err);
	gp_bus_destroy(bus);
	if (st)
		goto out;
	say(o->progress, "jetstream: %d streams declared\n", ns);

	snprintf(env, sizeof env,
		 "GENPIPE_NATS_URL=%s\nGENPIPE_DATABASE_URL=%s\nGENPIPE_DATA_DIR=%s\n"
		 "GENPIPE_MIGRATIONS_DIR=%s\n",
		 nats_url, db_url, o->data_dir, o->migrations_dir);
	snprintf(path, sizeof path, "%s/env", o->data_dir);
	if ((st = gp_file_write_atomic(path, env, strlen(env), 0600, err)))
		goto out;
	st = services_up(o, nats_url, db_url, err);
out:
	if (lockfd >= 0)
		close(lockfd);
	return st;
}

/* Stop one recorded process: sig, wait, then SIGKILL. */
static gp_status stop_one(const char *dir, const char *name, const char *prog, int sig,
			  FILE *progress, struct gp_err *err)
{
	char pidpath[PATHMAX];
	snprintf(pidpath, sizeof pidpath, "%s/run/%s.pid", dir, name);
	int pid = read_int(pidpath);
	if (pid <= 0)
		return GP_OK;
	if (!pid_runs(pid, prog)) {
		say(progress, "%s not running (stale pid %d)\n", name, pid);
		unlink(pidpath);
		return GP_OK;
	}
	kill(pid, sig);
	long long deadline = gp_now_ms() + 20000;
	while (gp_now_ms() < deadline) {
		waitpid(pid, NULL, WNOHANG); /* reap when it is our child (tests) */
		if (!pid_runs(pid, prog))
			break;
		gp_sleep_ms(50);
	}
	if (pid_runs(pid, prog)) {
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		say(progress, "%s (pid %d) did not stop in 20 s: killed\n", name, pid);
	} else {
		say(progress, "%s stopped (pid %d)\n", name, pid);
	}
	unlink(pidpath);
	(void)err;
	return GP_OK;
}

gp_status gp_stack_down(const char *dir, FILE *progress, struct gp_err *err)
{
	char path[PATHMAX];
	snprintf(path, sizeof path, "%s/run", dir);
	DIR *d = opendir(path);
	if (!d) {
		say(progress, "nothing to stop under %s\n", dir);
		return GP_OK;
	}
	int lockfd = -1;
	gp_status st = lock_dir(dir, &lockfd, err);
	if (st) {
		closedir(d);
		return st;
	}
	/* Services first, so they drain against a live bus and database. */
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		size_t l = strlen(e->d_name);
		if (l < 5 || strcmp(e->d_name + l - 4, ".pid") != 0)
			continue;
		char name[128];
		snprintf(name, sizeof name, "%.*s", (int)(l - 4), e->d_name);
		if (!strcmp(name, "nats") || !strcmp(name, "postgres"))
			continue;
		char prog[160];
		snprintf(prog, sizeof prog, "genpipe-%s", name);
		stop_one(dir, name, prog, SIGTERM, progress, err);
	}
	closedir(d);
	stop_one(dir, "nats", "nats-server", SIGTERM, progress, err);
	/* SIGINT is PostgreSQL's "fast" shutdown: abort sessions, checkpoint. */
	stop_one(dir, "postgres", "postgres", SIGINT, progress, err);
	close(lockfd);
	return GP_OK;
}

gp_status gp_stack_env(const char *dir, const char *key, char *out, size_t len,
		       struct gp_err *err)
{
	char path[PATHMAX], text[8192];
	snprintf(path, sizeof path, "%s/env", dir);
	if (read_small(path, text, sizeof text) < 0)
		return gp_err_set(err, GP_ERR_NOT_FOUND, "no stack under \"%s\" (%s missing); run "
				  "genpipe dev up",
				  dir, path);
	size_t kl = strlen(key);
	for (char *save, *line = strtok_r(text, "\n", &save); line;
	     line = strtok_r(NULL, "\n", &save)) {
		if (!strncmp(line, key, kl) && line[kl] == '=') {
			snprintf(out, len, "%s", line + kl + 1);
			return GP_OK;
		}
	}
	return gp_err_set(err, GP_ERR_NOT_FOUND, "%s has no %s", path, key);
}

static void push(struct gp_stack_proc **v, int *n, int *cap, const struct gp_stack_proc *p)
{
	if (*n == *cap) {
		*cap = *cap ? *cap * 2 : 8;
		struct gp_stack_proc *nv = realloc(*v, sizeof **v * (size_t)*cap);
		if (!nv)
			return;
		*v = nv;
	}
	(*v)[(*n)++] = *p;
}

gp_status gp_stack_status(const char *dir, const char *migrations_dir,
			  struct gp_stack_proc **procs, int *nprocs, struct gp_err *err)
{
	struct gp_stack_proc *v = NULL;
	int n = 0, cap = 0;
	char path[PATHMAX];

	/* nats */
	struct gp_stack_proc p = { .name = "nats" };
	p.pid = recorded_pid(dir, "nats");
	p.port = recorded_port(dir, "nats");
	p.alive = pid_runs(p.pid, "nats-server");
	if (p.alive) {
		snprintf(path, sizeof path, "%s/run/nats-monitor.port", dir);
		int mport = read_int(path);
		char url[128];
		snprintf(url, sizeof url, "http://127.0.0.1:%d/jsz", mport);
		long code = 0;
		char *body = NULL;
		struct gp_err e = { 0 };
		if (gp_http_get(url, 2000, &code, &body, &e) == GP_OK && code == 200) {
			int js = body && strstr(body, "\"config\"") && !strstr(body, "\"disabled\": true") &&
				 !strstr(body, "\"disabled\":true");
			p.healthy = js;
			snprintf(p.detail, sizeof p.detail, "%s",
				 js ? "jetstream enabled" : "jetstream DISABLED");
		} else {
			snprintf(p.detail, sizeof p.detail, "monitor not answering: %s", e.msg);
		}
		free(body);
	} else {
		snprintf(p.detail, sizeof p.detail, "not running");
	}
	push(&v, &n, &cap, &p);

	/* postgres */
	memset(&p, 0, sizeof p);
	snprintf(p.name, sizeof p.name, "postgres");
	p.pid = recorded_pid(dir, "postgres");
	p.port = recorded_port(dir, "postgres");
	p.alive = pid_runs(p.pid, "postgres");
	if (p.alive) {
		char url[512];
		struct gp_err e = { 0 };
		struct gp_db *db = NULL;
		int applied = 0, pending = 0;
		if (gp_stack_env(dir, "GENPIPE_DATABASE_URL", url, sizeof url, &e) == GP_OK &&
		    gp_db_connect(&db, url, 2000, &e) == GP_OK &&
		    gp_db_migration_status(db, migrations_dir, &applied, &pending, &e) == GP_OK) {
			p.healthy = pending == 0;
			snprintf(p.detail, sizeof p.detail, "accepting connections; migrations %d "
				 "applied, %d pending",
				 applied, pending);
		} else {
			snprintf(p.detail, sizeof p.detail, "%s", e.msg);
		}
		gp_db_destroy(db);
	} else {
		snprintf(p.detail, sizeof p.detail, "not running");
	}
	push(&v, &n, &cap, &p);

	/* services */
	snprintf(path, sizeof path, "%s/run", dir);
	DIR *d = opendir(path);
	if (d) {
		struct dirent *e;
		while ((e = readdir(d)) != NULL) {
			size_t l = strlen(e->d_name);
			if (l < 6 || strcmp(e->d_name + l - 5, ".port") != 0)
				continue;
			memset(&p, 0, sizeof p);
			snprintf(p.name, sizeof p.name, "%.*s", (int)(l - 5), e->d_name);
			if (!strcmp(p.name, "nats") || !strcmp(p.name, "postgres") ||
			    !strcmp(p.name, "nats-monitor"))
				continue;
			char prog[160];
			snprintf(prog, sizeof prog, "genpipe-%s", p.name);
			p.pid = recorded_pid(dir, p.name);
			p.port = recorded_port(dir, p.name);
			p.alive = pid_runs(p.pid, prog);
			if (p.alive) {
				char url[128];
				snprintf(url, sizeof url, "http://127.0.0.1:%d/readyz", p.port);
				long code = 0;
				char *body = NULL;
				struct gp_err ge = { 0 };
				if (gp_http_get(url, 2000, &code, &body, &ge) == GP_OK) {
					p.healthy = code == 200;
					size_t bl = strlen(body);
					while (bl && body[bl - 1] == '\n')
						body[--bl] = '\0';
					snprintf(p.detail, sizeof p.detail, "readyz %ld: %s", code, body);
				} else {
					snprintf(p.detail, sizeof p.detail, "%s", ge.msg);
				}
				free(body);
			} else {
				snprintf(p.detail, sizeof p.detail, "not running");
			}
			push(&v, &n, &cap, &p);
		}
		closedir(d);
	}
	(void)err;
	*procs = v;
	*nprocs = n;
	return GP_OK;
}
