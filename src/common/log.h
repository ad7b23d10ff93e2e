/*
 * Logging for every ipmpi process: one line per event, with a UTC timestamp,
 * the role ("controller", "engine 3", "client") and the level, on stderr.
 * ipmpi_log_open() points stderr (and optionally stdout) at a log file, so
 * output written by MPI, PMIx or embedded Python lands there too.
 * Thread safety: ipmpi_log() may be called from any thread (one write(2) per
 * line); ipmpi_log_setup()/ipmpi_log_open() only at start-up.
 */
#ifndef IPMPI_LOG_H
#define IPMPI_LOG_H

enum { IPMPI_LOG_ERROR = 0, IPMPI_LOG_WARN = 1, IPMPI_LOG_INFO = 2, IPMPI_LOG_DEBUG = 3 };

/* role is copied; level is the most verbose level printed. */
void ipmpi_log_setup(const char *role, int level);
/* Opens path for appending (mode 0600) and dup2s it onto fd 2, and onto fd 1
 * when also_stdout. Returns 0 or IPMPI_EIO. */
int ipmpi_log_open(const char *path, int also_stdout);
void ipmpi_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The wall clock the log's timestamps use, in seconds since the epoch with
 * microseconds: start-up steps are stamped with it so that one start's
 * logs from every process line up (tools/startup_phases.py). */
double ipmpi_log_clock(void);
/* This process's CPU time so far (user + system), in seconds. */
double ipmpi_log_cpu(void);

#endif
