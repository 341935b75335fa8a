// sbpg/pg/test_hooks.hpp
//   The one interface to the fault points sbpg's own test suite arms (include after postgres.h,
//   only from src/pg/). A fault is armed with sbpg.test_fault, which the server accepts only when
//   it was started with sbpg.test_hooks = on (a postmaster setting, superuser-only, not in the
//   sample configuration, set only by the test harness). Without it sbpg.test_fault refuses every
//   value but the empty one and Fires() is always false, so production control flow never
//   depends on a test fault.
//
//   Fires() neither throws nor raises a PostgreSQL error: it is safe to call from C++ frames and
//   from plain PostgreSQL code alike. What a fault does is up to its call site, one line each.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/test_hooks.hpp"
#endif

namespace sbpg::pg::testing {

enum Fault : int {
	// exit_after_commit#TAG: a worker leaves its loop after a batch commits, before it settles, and
	// exits with code 1. Fires once per TAG in the whole server (tests arm a new TAG each time).
	kExitAfterCommit,
	// fail_commit#MESSAGE_ID: the transaction that applied that message fails just before COMMIT,
	// as a deferred constraint would. Fires for every transaction that applied it.
	kFailCommit,
	// notify_queue_full: the NOTIFY queue counts as more than 90% full.
	kNotifyQueueFull,
};

// Defines sbpg.test_hooks and sbpg.test_fault (from _PG_init, before MarkGUCPrefixReserved).
void DefineSettings();

// Whether fault f fires now. subject: the message id, for kFailCommit; ignored otherwise.
bool Fires(Fault f, const char *subject = nullptr);

// The armed sbpg.test_fault value ("" when none), for the log line a call site writes when it
// acts on a fault.
const char *ArmedFault();

} // namespace sbpg::pg::testing
