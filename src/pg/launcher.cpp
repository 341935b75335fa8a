// src/pg/launcher.cpp
//   The launcher: one background worker that watches sbpg.subscriptions in sbpg.database and keeps
//   the workers of every enabled subscription running (one, or as many as its option `workers`;
//   an entry per worker, named by the subscription and the worker's number). It starts missing workers, restarts
//   stopped ones with backoff, and stops workers whose subscription was disabled, dropped or changed (a changed
//   subscription is restarted with its new settings). It holds no C++ objects: plain PostgreSQL
//   code, with errors caught per cycle.
#include "sbpg/core/fixed_text.hpp"

extern "C" {
#include "postgres.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
}

#include "sbpg/pg/compat.hpp"
#include "sbpg/pg/config.hpp"
#include "sbpg/pg/shared.hpp"
#include "sbpg/pg/slots.hpp"
#include "sbpg/pg/spi.hpp"

#include <algorithm>
#include <csignal>
#include <cstring>

namespace sbpg::pg {

namespace {

struct Desired {
	char name[kNameLen];
	char version[40];
	bool enabled;
	int workers;
};

struct Entry {
	bool used;
	char name[kNameLen];
	int worker; // which of the subscription's workers
	char version[40];
	int slot;
	BackgroundWorkerHandle *handle; // null when adopted from an earlier launcher or not running
	int adopted_pid;                // a worker started by an earlier launcher
	bool running;
	bool stopping;
	int failures;
	TimestampTz started_at;
	TimestampTz next_start;
};

// The launcher's own state, kept by sbpg_launcher_main and handed to every step (no file-scope
// state: nothing here is needed by a PostgreSQL callback).
struct Launcher {
	Entry *entries; // one per slot, in TopMemoryContext
	int nentries;
	Oid ext_owner;    // the extension's owner, whom workers connect as
	bool ext_present; // the extension exists in sbpg.database at this module's version (last read)
	// The extension's version when it is not this module's (SBPG_VERSION), said once per version:
	// the SQL objects are another release's, so no worker runs until ALTER EXTENSION sbpg UPDATE.
	char other_version[32];
};

Entry *
FindEntry(Launcher *l, const char *name, int worker) {
	for (int i = 0; i < l->nentries; ++i)
		if (l->entries[i].used && strcmp(l->entries[i].name, name) == 0 && l->entries[i].worker == worker)
			return &l->entries[i];
	return nullptr;
}

Entry *
NewEntry(Launcher *l, const char *name, int worker) {
	for (int i = 0; i < l->nentries; ++i) {
		if (!l->entries[i].used) {
			std::memset(&l->entries[i], 0, sizeof l->entries[i]);
			l->entries[i].used = true;
			compat::CopyCString(l->entries[i].name, name, kNameLen);
			l->entries[i].worker = worker;
			l->entries[i].slot = -1;
			return &l->entries[i];
		}
	}
	return nullptr;
}

// Reads what should run, in a short transaction of its own. Returns the number of subscriptions (0
// when the extension is absent).
int
LoadDesired(Launcher *l, Desired *out, int max) {
	int n = 0;
	spi::BeginShort();
	pgstat_report_activity(STATE_RUNNING, "reading sbpg.subscriptions");
	spi::SpiResult ext = spi::ExecSql("read pg_extension",
	                                  "SELECT extowner, extversion FROM pg_catalog.pg_extension WHERE extname" OP_EQ
	                                  "'sbpg'",
	                                  0, nullptr, nullptr, nullptr, SPI_OK_SELECT, 1);
	l->ext_present = ext.rows == 1;
	if (l->ext_present) {
		const char *version = ext.Text(0, ext.Col("extversion"));
		if (!version || strcmp(version, SBPG_VERSION) != 0) {
			l->ext_present = false;
			if (strncmp(l->other_version, version ? version : "", sizeof l->other_version - 1) != 0) {
				compat::CopyCString(l->other_version, version ? version : "", sizeof l->other_version);
				ereport(LOG, (errmsg("sbpg: the extension in this database is at version %s, the server's sbpg "
				                     "module at %s: no subscription runs until the extension is updated",
				                     version ? version : "?", SBPG_VERSION),
				              errhint("Run ALTER EXTENSION sbpg UPDATE in database \"%s\".", guc_database)));
			}
		} else if (l->other_version[0]) {
			ereport(LOG, (errmsg("sbpg: the extension is at version %s now; subscriptions start", SBPG_VERSION)));
			l->other_version[0] = '\0';
		}
	}
	if (l->ext_present) {
		l->ext_owner = ext.ObjectId(0, ext.Col("extowner"));
		// The version covers every setting of the subscription and of its identity, so a change
		// restarts the worker with the new configuration. The handler counts by the text that names
		// it, which a dropped function does not change: a dropped handler must pause the worker, not
		// restart it (which would hand its held messages back to the broker). run_as counts by its
		// OID. updated_at covers whatever alter_subscription changes.
		// Every name schema-qualified: the launcher's session belongs to a superuser.
		const char *q =
		    "SELECT s.name, s.enabled, "
		    "coalesce(CAST(s.options OPERATOR(pg_catalog.->>) 'workers' AS pg_catalog.int4), 1) AS workers, "
		    "pg_catalog.md5(CAST(ROW(s.name, s.namespace, s.entity, "
		    "s.handler, CAST(s.handler_owner AS pg_catalog.oid), CAST(s.run_as AS pg_catalog.oid), s.identity, s.batch_size, "
		    "s.prefetch, s.notify_channel, s.enabled, s.options, s.updated_at) AS pg_catalog.text) "
		    "OPERATOR(pg_catalog.||) "
		    "coalesce(CAST(ROW(i.*) AS pg_catalog.text), '') OPERATOR(pg_catalog.||) coalesce(k.secret, '')) "
		    "AS version "
		    "FROM sbpg.subscriptions s "
		    "LEFT JOIN sbpg.identities i ON i.name OPERATOR(pg_catalog.=) s.identity "
		    "LEFT JOIN sbpg.identity_secrets k ON k.identity OPERATOR(pg_catalog.=) s.identity "
		    "UNION ALL "
		    // Publishers: an entry named "pub:<name>" (subscription names have no colon).
		    "SELECT 'pub:' OPERATOR(pg_catalog.||) p.name, p.enabled, 1, "
		    "pg_catalog.md5(CAST(ROW(p.*) AS pg_catalog.text) OPERATOR(pg_catalog.||) "
		    "coalesce(CAST(ROW(i.*) AS pg_catalog.text), '') OPERATOR(pg_catalog.||) coalesce(k.secret, '')) "
		    "FROM sbpg.publishers p "
		    "LEFT JOIN sbpg.identities i ON i.name OPERATOR(pg_catalog.=) p.identity "
		    "LEFT JOIN sbpg.identity_secrets k ON k.identity OPERATOR(pg_catalog.=) p.identity "
		    "ORDER BY 1 USING OPERATOR(pg_catalog.<)";
		spi::SpiResult r = spi::ExecSql("read sbpg.subscriptions", q, 0, nullptr, nullptr, nullptr, SPI_OK_SELECT);
		int name_col = r.Col("name"), enabled_col = r.Col("enabled"), version_col = r.Col("version"),
		    workers_col = r.Col("workers");
		for (uint64 row = 0; row < r.rows && n < max; ++row) {
			char *name = r.Text(row, name_col);
			compat::CopyCString(out[n].name, name ? name : "", kNameLen);
			out[n].enabled = r.Bool(row, enabled_col);
			out[n].workers = std::max(1, r.Int32(row, workers_col, 1));
			char *ver = r.Text(row, version_col);
			compat::CopyCString(out[n].version, ver ? ver : "", sizeof out[n].version);
			++n;
		}
	}
	spi::EndShort();
	pgstat_report_activity(STATE_IDLE, nullptr);
	return n;
}

int
BackoffMs(int failures) {
	if (failures <= 0)
		return 0;
	int ms = 1000 << std::min(failures - 1, 3); // 1 s, 2 s, 4 s, then 8 s
	return ms;
}

bool
Alive(Entry *e) {
	if (e->handle) {
		pid_t pid;
		BgwHandleStatus st = GetBackgroundWorkerPid(e->handle, &pid);
		return st == BGWH_STARTED || st == BGWH_NOT_YET_STARTED;
	}
	if (e->adopted_pid > 0)
		return kill(e->adopted_pid, 0) == 0;
	return false;
}

void
StopEntry(Entry *e) {
	if (e->stopping)
		return;
	if (e->handle)
		TerminateBackgroundWorker(e->handle);
	else if (e->adopted_pid > 0)
		kill(e->adopted_pid, SIGTERM);
	e->stopping = true;
}

void
StartEntry(const Launcher *l, Entry *e, const Desired *d) {
	if (e->slot < 0)
		e->slot = AssignSlot(e->name, e->worker);
	if (e->slot < 0) {
		ereport(WARNING, (errmsg("sbpg: cannot start subscription \"%s\": all %d worker slots are in use", e->name,
		                         guc_max_workers),
		                  errhint("Raise sbpg.max_workers (and max_worker_processes) and restart the server.")));
		e->next_start = GetCurrentTimestamp() + 10 * USECS_PER_SEC;
		return;
	}
	BackgroundWorker w;
	std::memset(&w, 0, sizeof w);
	w.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	w.bgw_start_time = BgWorkerStart_RecoveryFinished;
	w.bgw_restart_time = BGW_NEVER_RESTART; // the launcher restarts it, with backoff
	snprintf(w.bgw_library_name, BGW_MAXLEN, "sbpg");
	bool publisher = strncmp(e->name, "pub:", 4) == 0;
	snprintf(w.bgw_function_name, BGW_MAXLEN, publisher ? "sbpg_publisher_main" : "sbpg_worker_main");
	if (publisher)
		snprintf(w.bgw_name, BGW_MAXLEN, "sbpg publisher %s", e->name + 4);
	else if (d->workers > 1)
		snprintf(w.bgw_name, BGW_MAXLEN, "sbpg worker %s #%d", e->name, e->worker);
	else
		snprintf(w.bgw_name, BGW_MAXLEN, "sbpg worker %s", e->name);
	snprintf(w.bgw_type, BGW_MAXLEN, publisher ? "sbpg publisher" : "sbpg worker");
	w.bgw_notify_pid = MyProcPid;
	WorkerStart start;
	std::memset(&start, 0, sizeof start);
	start.database = MyDatabaseId;
	start.user = l->ext_owner;
	start.slot = e->slot;
	start.worker = e->worker;
	compat::CopyCString(start.name, e->name, kNameLen);
	static_assert(sizeof(WorkerStart) <= BGW_EXTRALEN, "WorkerStart must fit bgw_extra");
	std::memcpy(w.bgw_extra, &start, sizeof start);
	BackgroundWorkerHandle *handle = nullptr;
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
	bool ok = RegisterDynamicBackgroundWorker(&w, &handle);
	MemoryContextSwitchTo(old);
	if (!ok) {
		ereport(WARNING,
		        (errmsg("sbpg: cannot start a worker for subscription \"%s\": no background worker slot is free",
		                e->name),
		         errhint("Raise max_worker_processes and restart the server.")));
		e->next_start = GetCurrentTimestamp() + 10 * USECS_PER_SEC;
		return;
	}
	e->handle = handle;
	e->adopted_pid = 0;
	e->running = true;
	e->stopping = false;
	e->started_at = GetCurrentTimestamp();
	compat::CopyCString(e->version, d->version, sizeof e->version);
}

// A previous launcher's workers keep running after it dies: adopt them by their slots.
void
AdoptRunningWorkers(Launcher *l) {
	for (int i = 0; i < shared->nslots; ++i) {
		WorkerSlot copy;
		CopySlot(i, &copy);
		if (!copy.in_use || copy.pid <= 0 || kill(copy.pid, 0) != 0)
			continue;
		Entry *e = NewEntry(l, copy.name, copy.worker);
		if (!e)
			break;
		e->slot = i;
		e->adopted_pid = copy.pid;
		e->running = true;
		e->started_at = GetCurrentTimestamp();
		compat::CopyCString(e->version, "adopted", sizeof e->version); // restarted once to learn its version
	}
}

// Frees the entry (and statistics slot) of a subscription that is disabled and not running, for an
// enabled one that has none: the entries are as many as sbpg.max_workers, and a disabled
// subscription keeps its entry, to show its last figures in sbpg.stats, only while there is room.
bool
ReclaimIdleEntry(Launcher *l, const Desired *desired, int nd) {
	for (int i = 0; i < l->nentries; ++i) {
		Entry *e = &l->entries[i];
		if (!e->used || e->running)
			continue;
		bool enabled = false;
		for (int k = 0; k < nd; ++k)
			if (strcmp(desired[k].name, e->name) == 0)
				enabled = desired[k].enabled;
		if (enabled)
			continue;
		if (e->slot >= 0)
			FreeSlot(e->slot);
		e->used = false;
		return true;
	}
	return false;
}

void
Reconcile(Launcher *l) {
	Desired *desired = static_cast<Desired *>(palloc0(sizeof(Desired) * (l->nentries + 64)));
	int nd = LoadDesired(l, desired, l->nentries + 64);
	TimestampTz now = GetCurrentTimestamp();

	// Workers that stopped, and workers that must stop.
	for (int i = 0; i < l->nentries; ++i) {
		Entry *e = &l->entries[i];
		if (!e->used)
			continue;
		if (e->running && !Alive(e)) {
			e->running = false;
			e->handle = nullptr;
			e->adopted_pid = 0;
			if (!e->stopping) {
				// It stopped by itself: restart with backoff, resetting after a long healthy run.
				if (now - e->started_at > 60 * USECS_PER_SEC)
					e->failures = 0;
				++e->failures;
				e->next_start = now + static_cast<int64>(BackoffMs(e->failures)) * 1000;
			} else {
				e->next_start = now;
			}
			e->stopping = false;
		}
		const Desired *d = nullptr;
		for (int k = 0; k < nd; ++k)
			if (strcmp(desired[k].name, e->name) == 0 && e->worker < desired[k].workers)
				d = &desired[k];
		bool wanted = d && d->enabled;
		if (e->running && (!wanted || strcmp(d->version, e->version) != 0))
			StopEntry(e);
		if (!e->running && !d) {
			// Dropped: forget it and its statistics.
			if (e->slot >= 0)
				FreeSlot(e->slot);
			e->used = false;
		} else if (!e->running && d && !d->enabled && e->slot >= 0) {
			WorkerSlot *s = &shared->slots[e->slot];
			SpinLockAcquire(&s->mutex);
			s->state = kStateStopped;
			s->pid = 0;
			SpinLockRelease(&s->mutex);
		}
	}
	// Workers that should run.
	bool full = false;
	for (int k = 0; k < nd; ++k) {
		if (!desired[k].enabled)
			continue;
		for (int wk = 0; wk < desired[k].workers; ++wk) {
			Entry *e = FindEntry(l, desired[k].name, wk);
			if (!e)
				e = NewEntry(l, desired[k].name, wk);
			if (!e && ReclaimIdleEntry(l, desired, nd))
				e = NewEntry(l, desired[k].name, wk);
			if (!e) {
				// Said once per cycle; the other subscriptions, which may hold entries already, go on.
				if (!full)
					ereport(WARNING,
					        (errmsg("sbpg: the enabled subscriptions need more workers than sbpg.max_workers (%d)",
					                guc_max_workers),
					         errhint("Raise sbpg.max_workers (and max_worker_processes) and restart the server, "
					                 "or lower a subscription's option workers.")));
				full = true;
				break;
			}
			if (!e->running && now >= e->next_start)
				StartEntry(l, e, &desired[k]);
		}
	}
	pfree(desired);
}

int
NextWaitMs(const Launcher *l) {
	TimestampTz now = GetCurrentTimestamp();
	long ms = 1000; // also notices CREATE EXTENSION and DROP EXTENSION within a second
	for (int i = 0; i < l->nentries; ++i) {
		Entry *e = &l->entries[i];
		if (e->used && !e->running && e->next_start > now)
			ms = std::min<long>(ms, (e->next_start - now) / 1000 + 1);
	}
	return static_cast<int>(std::max<long>(ms, 10));
}

} // namespace

} // namespace sbpg::pg

using namespace sbpg::pg;

void
sbpg_launcher_main(Datum) {
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(guc_database, nullptr, 0);
	PinSessionSettings();
	pgstat_report_appname("sbpg launcher");

	Launcher *l = static_cast<Launcher *>(MemoryContextAllocZero(TopMemoryContext, sizeof(Launcher)));
	l->nentries = shared->nslots;
	l->entries = static_cast<Entry *>(MemoryContextAllocZero(TopMemoryContext, sizeof(Entry) * l->nentries));
	shared->launcher_latch = &MyProc->procLatch;
	AdoptRunningWorkers(l);
	ereport(LOG, (errmsg("sbpg launcher started for database \"%s\"", guc_database)));

	MemoryContext loop_cxt = AllocSetContextCreate(TopMemoryContext, "sbpg launcher loop", ALLOCSET_DEFAULT_SIZES);
	bool last_error_logged = false;
	for (;;) {
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending) {
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		MemoryContext old = MemoryContextSwitchTo(loop_cxt);
		PG_TRY();
		{
			Reconcile(l);
			last_error_logged = false;
		}
		PG_CATCH();
		{
			// Say it once per streak; keep going (a DROP EXTENSION can race with the query).
			MemoryContextSwitchTo(loop_cxt);
			ErrorData *ed = CopyErrorData();
			FlushErrorState();
			if (!last_error_logged)
				ereport(LOG, (errmsg("sbpg launcher: %s", ed->message)));
			last_error_logged = true;
			AbortCurrentTransaction();
		}
		PG_END_TRY();
		MemoryContextSwitchTo(old);
		MemoryContextReset(loop_cxt);
		if (!l->ext_present) {
			for (int i = 0; i < l->nentries; ++i)
				if (l->entries[i].used && l->entries[i].running)
					StopEntry(&l->entries[i]);
		}
		(void)WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, NextWaitMs(l), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
