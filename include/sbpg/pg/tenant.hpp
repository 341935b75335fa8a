// sbpg/pg/tenant.hpp
//   Tenant code under run_as (tenant.cpp): the one context all of it runs in (handler, upcasts,
//   mappings, mapping diagnosis), its time limit, and the checks before it may run. Include after
//   postgres.h, sbpg/pg/apply.hpp and sbpg/pg/pass.hpp, only from the files that apply batches.
//   docs/security.md says what this context guarantees; test/security checks it.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/tenant.hpp"
#endif

extern "C" {
#include "access/xact.h"
#include "utils/elog.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
}

namespace sbpg::pg {

// Whether the handler can run at all (it exists, has the shape, is not SECURITY DEFINER, run_as
// may execute it and is neither an unallowed superuser nor an sbpg_admin); false fills why. When
// it can, loads it and the sbpg.message row type into the pass.
bool HandlerUsable(Pass *pass, ErrorText *why);

// Reads the subscription's declarative mappings into the pass (the transaction's memory).
void LoadMappings(Pass *pass);

// Runs one message's tenant code in the current (sub)transaction within one budget of
// handler_timeout_ms: its upcasts, then its mapping (it->in_mapping set while that runs) or the
// handler. Errors propagate; then RunAsFailed must be called.
void RunTenantCode(Pass *pass, ApplyItem *it);

// Whether the message goes through a declarative mapping of its type (then never to a set-based
// handler).
bool HasMapping(const Pass *pass, const ApplyItem *it);
// Runs a set-based handler, (sbpg.message[]), once for the messages set[0..n) in the current
// (sub)transaction within one budget of handler_timeout_ms for the call (their upcasts included).
// Errors propagate; then RunAsFailed must be called.
void RunSetHandler(Pass *pass, ApplyItem *const *set, int n);
// After a mapping failed with a data error: which column could not take which value (palloc'd),
// or nullptr. Runs as run_as in a subtransaction of its own, with a fresh time budget.
char *DiagnoseMapping(Pass *pass, const ApplyItem *it);

// The subscription and messages (set[0..n)) of the handler call running now, for
// sbpg.session_state() and sbpg.set_session_state() (session_state.cpp). Set by the pass just
// before tenant code runs for them, cleared when it returns, by RunAsFailed (which every path
// after a failed tenant call takes) and by InSubtransaction's catch; the pointers must stay valid
// until then.
void SetApplying(const char *subscription, ApplyItem *const *set, int n);
void ClearApplying();

// Stops the timers of tenant code; a cancel they asked for and nobody took is dropped, so it
// cannot fail the worker's own next statement. Every catch path calls it before rolling back.
void StopRunAsTimers(const TenantClock *clock);

// After an error escaped tenant code: the abort restores the user and the settings; this stops the
// timers, clears the clock, and says whether it was the time limit that ended the tenant code.
bool RunAsFailed(TenantClock *clock, int sqlerrcode);

// Runs fn in a subtransaction of its own. When it raises, the tenant timers are stopped, the
// subtransaction rolled back and the error handed back in *err (the caller frees it). The caller's
// memory context and resource owner are current again either way; fn runs in the caller's memory
// context.
template <typename Fn>
bool
InSubtransaction(const TenantClock *clock, Fn &&fn, ErrorData **err) {
	MemoryContext before = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile bool ok = true;
	BeginInternalSubTransaction(nullptr);
	MemoryContextSwitchTo(before);
	PG_TRY();
	{
		fn();
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		ClearApplying();
		StopRunAsTimers(clock); // before the rollback: a cancel must not leak past it
		MemoryContextSwitchTo(before);
		*err = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(before);
	CurrentResourceOwner = owner;
	return ok;
}

} // namespace sbpg::pg
