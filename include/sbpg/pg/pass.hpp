// sbpg/pg/pass.hpp
//   The state of one pass over a batch: one transaction that applies items[lo..hi), with or without
//   a subtransaction per message (pass.cpp). Every step of the pass (inbox.cpp, retry.cpp,
//   tenant.cpp, outcome.cpp) gets it explicitly; nothing of a pass lives in a global. Include after
//   postgres.h and sbpg/pg/apply.hpp, only from the files that apply batches.
//
//   Invariants: a Pass is plain data, set up at the start of each pass (BeginPass) in the memory of
//   its transaction, and read by the pass's error recovery after PostgreSQL longjmped: it lives
//   in a frame outside the one that raised, and is reached only through a pointer.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/pass.hpp"
#endif

extern "C" {
#include "access/tupdesc.h"
#include "datatype/timestamp.h"
#include "fmgr.h"
}

namespace sbpg::pg {

// A declarative mapping of the subscription, read once per pass into the transaction's memory.
struct Mapping {
	char *message_type;
	Datum target, action, keys, column_map; // keys is 0 when NULL
};

// The time limit of tenant code (tenant.cpp): one budget of handler_timeout_ms per message for its
// upcasts and its handler or mapping, a fresh one for a mapping diagnosis.
struct TenantClock {
	TimestampTz message_deadline; // the budget of the message being applied (0: none)
	TimestampTz deadline;         // the deadline of the tenant code running now (0: none runs)
};

struct Pass {
	const SubConfig *cfg;
	uint64 xid;  // the transaction's, once the handler was found usable
	bool notify; // outcomes are notified: a channel, and its queue not nearly full (outcome.cpp)
	// Tenant code, loaded for the pass (tenant.cpp).
	FmgrInfo handler;
	bool set_handler;       // the handler takes the batch: (sbpg.message[])
	TupleDesc message_desc; // sbpg.message
	Mapping *mappings;
	int nmappings;
	Oid apply_mapping_fn;    // sbpg._apply_mapping
	Oid diagnose_mapping_fn; // sbpg._diagnose_mapping
	TenantClock clock;
	// For the recovery of a pass without subtransactions: which message was running when it failed.
	int applying;      // the item being applied (-1: none)
	int first_applied; // the first item the pass applied (-1: none yet)
	bool set_call;     // a set-based handler's call for several messages is running
};

} // namespace sbpg::pg
