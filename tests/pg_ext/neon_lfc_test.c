/*
 * neon_lfc_test: a test-only stand-in for the two local-file-cache settings of Neon's
 * Postgres extension, so vm-monitor's file-cache code can be tested against stock
 * PostgreSQL 15.
 *
 * Stock Postgres accepts `neon.*` names only as unit-less placeholder strings, so
 * `pg_size_bytes(current_setting('neon.file_cache_size_limit'))` would read '300' as 300
 * bytes. Defining the settings as integers with unit MB makes Postgres report "300MB",
 * exactly as it does under Neon's extension.
 *
 * It only defines settings: there is no cache, no shared memory and no SQL objects, so no
 * control file is needed. Load it with shared_preload_libraries (an absolute path to the
 * built .so works), because neon.max_file_cache_size can only be set at server start.
 */
#include "postgres.h"

#include <limits.h>

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

/* Both in MB, the settings' unit; 0 (the default) means the cache is disabled. */
static int	max_file_cache_size_mb = 0;
static int	file_cache_size_limit_mb = 0;

/*
 * Neon refuses a limit above the maximum (the maximum sizes the cache's shared memory at
 * start), which is why vm-monitor caps the value itself before ALTER SYSTEM.
 */
static bool
check_file_cache_size_limit(int *newval, void **extra, GucSource source)
{
	if (*newval > max_file_cache_size_mb)
	{
		GUC_check_errmsg("neon.file_cache_size_limit can not be larger than neon.max_file_cache_size");
		return false;
	}
	return true;
}

void
_PG_init(void)
{
	/* A postmaster-only setting defined later would never take its configured value. */
	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("neon_lfc_test must be loaded via shared_preload_libraries")));

	/* Defined first: the limit's check hook compares against it while the config is applied. */
	DefineCustomIntVariable("neon.max_file_cache_size",
							"Maximal size of the local file cache (test stand-in).",
							NULL,
							&max_file_cache_size_mb,
							0,
							0,
							INT_MAX,
							PGC_POSTMASTER,
							GUC_UNIT_MB,
							NULL,
							NULL,
							NULL);

	DefineCustomIntVariable("neon.file_cache_size_limit",
							"Current limit of the local file cache size (test stand-in).",
							NULL,
							&file_cache_size_limit_mb,
							0,
							0,
							INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_MB,
							check_file_cache_size_limit,
							NULL,
							NULL);

	MarkGUCPrefixReserved("neon");
}
