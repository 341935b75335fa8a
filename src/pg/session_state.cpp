// src/pg/session_state.cpp
//   What a worker is applying now, for sbpg.session_state() and sbpg.set_session_state(): the
//   subscription and the messages of the running handler call, set by the pass around tenant code
//   (SetApplying / ClearApplying) and read by the SQL function sbpg._applying_session(), which
//   those two SECURITY DEFINER functions call. Invariants: the applying context is set only in a
//   worker, only while tenant code runs for those messages, and cleared when it returns and on
//   every error path (RunAsFailed, InSubtransaction's catch); tenant code cannot set it,
//   so a handler reaches only the sessions of the messages it was given. Also the statements that
//   read the states to copy to the broker, and record what it accepted.
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/message/message.hpp"
#include "sbpg/pg/pg_error.hpp"

extern "C" {
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

PGDLLEXPORT Datum sbpg_applying_session(PG_FUNCTION_ARGS);
PGDLLEXPORT Datum sbpg_applying_message(PG_FUNCTION_ARGS);
PG_FUNCTION_INFO_V1(sbpg_applying_session);
PG_FUNCTION_INFO_V1(sbpg_applying_message);
}

#include "sbpg/pg/apply.hpp"
#include "sbpg/pg/pass.hpp"
#include "sbpg/pg/spi.hpp"
#include "sbpg/pg/sql_entry.hpp"
#include "sbpg/pg/tenant.hpp"

#include <cstring>

namespace sbpg::pg {

namespace {

// Per process: what the running handler call applies (see the file comment), and whether it wrote
// a session's state since the worker last looked (TakeStateWritten).
const char *applying_subscription = nullptr;
ApplyItem *const *applying_set = nullptr;
int applying_n = 0;
bool state_written = false;

// The session a call to sbpg._applying_session names: `wanted` when one of the call's messages is
// of that session; with wanted null, the one session of the call's session messages (null when
// there is none, or several).
const std::string *
SessionInHand(const char *wanted) {
	const std::string *found = nullptr;
	for (int i = 0; i < applying_n; ++i) {
		const ReceivedMessage *m = applying_set[i]->msg;
		if (!m->in_session)
			continue;
		if (wanted) {
			if (m->session_id == wanted)
				return &m->session_id;
		} else if (!found) {
			found = &m->session_id;
		} else if (*found != m->session_id) {
			return nullptr;
		}
	}
	return found;
}

// sbpg._applying_message(): {traceparent, message_id} of the one message the running handler call
// applies (a per-message handler, or a set-based call with one message), for sbpg.send; NULL
// outside a handler and for a call of several messages (which one would a send belong to?).
Datum
ApplyingMessage(FunctionCallInfo fcinfo) {
	if (!applying_subscription || applying_n != 1)
		PG_RETURN_NULL();
	const ReceivedMessage *m = applying_set[0]->msg;
	Datum elems[2] = {m->traceparent.empty() ? (Datum)0 : CStringGetTextDatum(m->traceparent.c_str()),
	                  m->message_id.empty() ? (Datum)0 : CStringGetTextDatum(m->message_id.c_str())};
	bool nulls[2] = {m->traceparent.empty(), m->message_id.empty()};
	int dims[1] = {2}, lbs[1] = {1};
	PG_RETURN_ARRAYTYPE_P(construct_md_array(elems, nulls, 1, dims, lbs, TEXTOID, -1, false, TYPALIGN_INT));
}

Datum
ApplyingSession(FunctionCallInfo fcinfo) {
	if (!applying_subscription)
		PG_RETURN_NULL();
	const char *wanted = PG_ARGISNULL(0) ? nullptr : text_to_cstring(PG_GETARG_TEXT_PP(0));
	const std::string *sid = SessionInHand(wanted);
	if (!sid)
		PG_RETURN_NULL();
	if (!PG_ARGISNULL(1) && PG_GETARG_BOOL(1))
		state_written = true;
	Datum elems[2] = {CStringGetTextDatum(applying_subscription), CStringGetTextDatum(sid->c_str())};
	PG_RETURN_ARRAYTYPE_P(construct_array(elems, 2, TEXTOID, -1, false, TYPALIGN_INT));
}

} // namespace

void
SetApplying(const char *subscription, ApplyItem *const *set, int n) {
	applying_subscription = subscription;
	applying_set = set;
	applying_n = n;
}

void
ClearApplying() {
	applying_subscription = nullptr;
	applying_set = nullptr;
	applying_n = 0;
}

bool
TakeStateWritten() {
	bool w = state_written;
	state_written = false;
	return w;
}

namespace {

constexpr spi::PlanSpec kUnsynced = {
    "read the session states the broker has not accepted",
    "SELECT t.session_id, t.state, t.version FROM sbpg.session_states t "
    "WHERE t.subscription" OP_EQ "$1 AND t.version OPERATOR(pg_catalog.<>) t.synced_version "
    "ORDER BY t.updated_at USING" OP_LT "LIMIT $2",
    2,
    {TEXTOID, INT4OID},
    false,
};

constexpr spi::PlanSpec kSynced = {
    "record the session states the broker accepted",
    "UPDATE sbpg.session_states t SET synced_version = a.version "
    "FROM ROWS FROM (pg_catalog.unnest($2), pg_catalog.unnest($3)) AS a(session_id, version) "
    "WHERE t.subscription" OP_EQ "$1 AND t.session_id" OP_EQ "a.session_id AND t.synced_version" OP_LT "a.version",
    3,
    {TEXTOID, TEXTARRAYOID, INT8ARRAYOID},
    false,
};

char *
CopyTo(MemoryContext cxt, const char *p, size_t n) {
	char *out = static_cast<char *>(MemoryContextAlloc(cxt, n + 1));
	memcpy(out, p, n);
	out[n] = '\0';
	return out;
}

} // namespace

int
UnsyncedSessionStates(const SubConfig *cfg, int max, MemoryContext cxt, SessionStateRow *out) {
	int n = 0;
	spi::ShortTransaction([&] {
		Datum args[2] = {CStringGetTextDatum(cfg->name), Int32GetDatum(max)};
		spi::SpiResult r = spi::Exec(kUnsynced, args, nullptr, SPI_OK_SELECT);
		int c_sid = r.Col("session_id"), c_state = r.Col("state"), c_version = r.Col("version");
		for (uint64 i = 0; i < r.rows && n < max; ++i) {
			SessionStateRow &row = out[n++];
			row.session_id = r.Text(i, c_sid, cxt);
			Datum st;
			row.has_state = r.Get(i, c_state, &st);
			if (row.has_state) {
				bytea *b = DatumGetByteaPP(st);
				row.state_len = VARSIZE_ANY_EXHDR(b);
				row.state = CopyTo(cxt, VARDATA_ANY(b), row.state_len);
			} else {
				row.state = nullptr;
				row.state_len = 0;
			}
			row.version = r.Int64(i, c_version);
		}
	});
	return n;
}

void
MarkSessionStatesSynced(const SubConfig *cfg, const char *const *session_ids, const int64 *versions, int n) {
	if (n == 0)
		return;
	spi::ShortTransaction(
	    [&] {
		    Datum *ids = static_cast<Datum *>(palloc(sizeof(Datum) * n));
		    Datum *vs = static_cast<Datum *>(palloc(sizeof(Datum) * n));
		    for (int i = 0; i < n; ++i) {
			    ids[i] = CStringGetTextDatum(session_ids[i]);
			    vs[i] = Int64GetDatum(versions[i]);
		    }
		    Datum args[3] = {CStringGetTextDatum(cfg->name),
		                     PointerGetDatum(construct_array(ids, n, TEXTOID, -1, false, TYPALIGN_INT)),
		                     PointerGetDatum(construct_array(vs, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE))};
		    (void)spi::Exec(kSynced, args, nullptr, SPI_OK_UPDATE);
	    },
	    spi::Commit::kLazy);
}

} // namespace sbpg::pg

extern "C" Datum
sbpg_applying_session(PG_FUNCTION_ARGS) {
	return sbpg::pg::SqlEntry("sbpg._applying_session()", fcinfo, sbpg::pg::ApplyingSession);
}

Datum
sbpg_applying_message(PG_FUNCTION_ARGS) {
	return sbpg::pg::SqlEntry("sbpg._applying_message()", fcinfo, sbpg::pg::ApplyingMessage);
}
