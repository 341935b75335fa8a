// src/pg/test_hooks.cpp
//   The test interface (sbpg/pg/test_hooks.hpp): the settings sbpg.test_hooks and sbpg.test_fault,
//   and the one function that says whether a fault fires. Invariant: with sbpg.test_hooks off (the
//   default, and the only value outside the test harness) sbpg.test_fault can only be empty and
//   Fires() returns false.
#include "sbpg/core/fixed_text.hpp"

extern "C" {
#include "postgres.h"

#include "utils/guc.h"
}

#include "sbpg/pg/compat.hpp"
#include "sbpg/pg/shared.hpp"
#include "sbpg/pg/slots.hpp"
#include "sbpg/pg/test_hooks.hpp"

#include <cstring>

namespace sbpg::pg {

namespace testing {

namespace {

// sbpg.test_hooks, written by PostgreSQL's GUC machinery (PGC_POSTMASTER: fixed at server start).
bool hooks_enabled = false;
// sbpg.test_fault, written by PostgreSQL's GUC machinery; read only here, through Fires().
char *guc_test_fault = nullptr;

// A fault may be armed only in a server started with sbpg.test_hooks = on. sbpg.test_hooks is
// defined first, so at server start its value is known when the stored sbpg.test_fault is checked.
bool
CheckTestFault(char **newval, void **, GucSource) {
	if (!*newval || !**newval || hooks_enabled)
		return true;
	GUC_check_errmsg("sbpg.test_fault is for sbpg's own test suite");
	GUC_check_errdetail("The server was not started with sbpg.test_hooks = on, so no fault point can be armed.");
	GUC_check_errhint("Leave sbpg.test_fault empty.");
	return false;
}

bool
ArmedWith(const char *prefix, const char **rest) {
	size_t n = std::strlen(prefix);
	if (std::strncmp(guc_test_fault, prefix, n) != 0)
		return false;
	*rest = guc_test_fault + n;
	return true;
}

} // namespace

void
DefineSettings() {
	DefineCustomBoolVariable("sbpg.test_hooks",
	                         "Lets sbpg's own test suite arm fault points; never set it in production.",
	                         "Only sbpg's test harness sets it. Without it sbpg.test_fault must stay empty.",
	                         &hooks_enabled, false, PGC_POSTMASTER, GUC_NOT_IN_SAMPLE | GUC_SUPERUSER_ONLY, nullptr,
	                         nullptr, nullptr);
	DefineCustomStringVariable("sbpg.test_fault", "Fault injection for sbpg's own tests; leave empty.",
	                           "Accepted only in a server started with sbpg.test_hooks = on. exit_after_commit#TAG "
	                           "makes a worker exit after a batch commits and before it settles, once per TAG; "
	                           "fail_commit#MESSAGE_ID fails the COMMIT of the transaction that applied that message; "
	                           "notify_queue_full takes the NOTIFY queue for full.",
	                           &guc_test_fault, "", PGC_SUSET, GUC_NOT_IN_SAMPLE | GUC_SUPERUSER_ONLY, CheckTestFault,
	                           nullptr, nullptr);
}

const char *
ArmedFault() {
	return hooks_enabled && guc_test_fault ? guc_test_fault : "";
}

bool
Fires(Fault f, const char *subject) {
	if (!hooks_enabled || !guc_test_fault || !*guc_test_fault)
		return false;
	const char *rest = nullptr;
	switch (f) {
	case kExitAfterCommit:
		// Once per tag: the tag that fired is kept in shared memory, so the worker the launcher
		// starts again does not fire it a second time. (Unlocked: tests arm it with one worker
		// running a batch at a time.)
		if (!ArmedWith("exit_after_commit#", &rest) || !shared)
			return false;
		if (std::strcmp(shared->test_fault_fired, guc_test_fault) == 0)
			return false;
		compat::CopyCString(shared->test_fault_fired, guc_test_fault, sizeof shared->test_fault_fired);
		return true;
	case kFailCommit:
		return ArmedWith("fail_commit#", &rest) && subject && std::strcmp(rest, subject) == 0;
	case kNotifyQueueFull:
		return std::strcmp(guc_test_fault, "notify_queue_full") == 0;
	}
	return false;
}

} // namespace testing

} // namespace sbpg::pg
