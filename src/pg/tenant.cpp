// src/pg/tenant.cpp
//   Tenant code under run_as: the handler, upcasts, declarative mappings and the mapping diagnosis,
//   all through one context (EnterRunAs / LeaveRunAs, CallAsRunAs): run_as as the current user, a
//   security-restricted operation (no SET ROLE, no temporary objects, no deferred triggers, no
//   cursors WITH HOLD), run_as's search_path, sbpg._caller() = run_as, and a time limit. Leaving it
//   restores every setting the tenant changed, session-level SETs included (GUC changes are undone
//   as at an abort, the way PostgreSQL's own maintenance commands run a table owner's code). An
//   error in between is cleaned up by the (sub)transaction's abort and by RunAsFailed.
//
//   The time limit: one budget of handler_timeout_ms per message for its upcasts and its handler or
//   mapping (RunTenantCode), a fresh one for a diagnosis. At the deadline the statement is
//   cancelled, and again every 100 ms while tenant code goes on (it may catch query_canceled);
//   tenant code that returns after the deadline has failed all the same; and tenant code still
//   running one more budget (at least a second) later ends the worker: its transaction rolls back
//   and the broker delivers the message again.
//
//   Runs inside PgGuard and owns no C++ objects with destructors. docs/security.md states the
//   properties; test/security and test/pgtap/security.sql check them.
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/message/message.hpp"

extern "C" {
#include "postgres.h"

#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lock.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/regproc.h"
#include "utils/syscache.h"
#include "utils/timeout.h"
#include "utils/typcache.h"
}

#include "sbpg/pg/apply.hpp"
#include "sbpg/pg/compat.hpp"
#include "sbpg/pg/outcome.hpp"
#include "sbpg/pg/pass.hpp"
#include "sbpg/pg/shared.hpp"
#include "sbpg/pg/spi.hpp"
#include "sbpg/pg/tenant.hpp"

#include <algorithm>
#include <csignal>
#include <cstring>

namespace sbpg::pg {

namespace {

// sbpg.message's attributes, in the order BuildMessage fills them (the 0.1 type, then
// traceparent from 0.3).
constexpr int kMessageAttributes = 17;

// The timer that ends the worker when tenant code outlives its time limit by a budget. Registered
// once per process (PostgreSQL's timeouts cannot be unregistered), hence file-scope.
TimeoutId end_worker_timeout = MAX_TIMEOUTS;
// Set by that timer's handler (signal context), read by the exit callback through EndedByTimeLimit.
volatile sig_atomic_t ended_by_limit = 0;

// A timeout handler (signal context): only flags.
void
EndWorker() {
	if (proc_exit_inprogress)
		return; // ending already, for another reason
	ended_by_limit = 1;
	ProcDiePending = true;
	InterruptPending = true;
	SetLatch(MyLatch);
}

void
ErrorTimedOut(const SubConfig *cfg) {
	ereport(ERROR, (errcode(ERRCODE_QUERY_CANCELED),
	                errmsg("canceling statement due to the time limit of sbpg (handler_timeout_ms, %d ms)",
	                       cfg->handler_timeout_ms)));
}

// What EnterRunAs saved, for LeaveRunAs.
struct RunAs {
	Oid save_user;
	int save_sec;
	int nest;
	Oid save_tenant;
};

void
EnterRunAs(const SubConfig *cfg, TenantClock *clock, RunAs *r) {
	bool outermost = !OidIsValid(tenant_role);
	if (outermost) {
		TimestampTz now = GetCurrentTimestamp();
		clock->deadline = clock->message_deadline ? clock->message_deadline
		                                          : now + static_cast<int64>(cfg->handler_timeout_ms) * 1000;
		if (now >= clock->deadline)
			ErrorTimedOut(cfg); // the message's budget went to its upcasts
	}
	GetUserIdAndSecContext(&r->save_user, &r->save_sec);
	r->save_tenant = tenant_role;
	r->nest = NewGUCNestLevel();
	tenant_role = cfg->run_as;
	SetUserIdAndSecContext(cfg->run_as, r->save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
	if (cfg->search_path)
		(void)set_config_option("search_path", cfg->search_path, PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0,
		                        false);
	if (outermost) {
		enable_timeout_every(STATEMENT_TIMEOUT, clock->deadline, 100);
		if (end_worker_timeout == MAX_TIMEOUTS)
			end_worker_timeout = RegisterTimeout(USER_TIMEOUT, EndWorker);
		int64 grace_us = std::max<int64>(static_cast<int64>(cfg->handler_timeout_ms) * 1000, USECS_PER_SEC);
		enable_timeout_at(end_worker_timeout, clock->deadline + grace_us);
	}
}

void
LeaveRunAs(const SubConfig *cfg, TenantClock *clock, const RunAs *r) {
	if (!OidIsValid(r->save_tenant)) {
		StopRunAsTimers(clock);
		if (GetCurrentTimestamp() >= clock->deadline)
			ErrorTimedOut(cfg); // returned, but late (or after catching the cancel)
		clock->deadline = 0;
	}
	AtEOXact_GUC(false, r->nest);
	SetUserIdAndSecContext(r->save_user, r->save_sec);
	tenant_role = r->save_tenant;
}

// Calls a function of tenant code (at most 5 arguments; an argument is NULL where it is 0 and
// null_if_zero says so) in the run_as context. Returns its result; *isnull says whether it is NULL.
constexpr int kMaxTenantArgs = 5;

Datum
CallAsRunAs(Pass *pass, FmgrInfo *flinfo, int nargs, const Datum *args, bool null_if_zero, bool *isnull) {
	if (nargs > kMaxTenantArgs)
		elog(ERROR, "sbpg: a tenant function called with %d arguments (at most %d)", nargs, kMaxTenantArgs);
	RunAs r;
	EnterRunAs(pass->cfg, &pass->clock, &r);
	LOCAL_FCINFO(fcinfo, kMaxTenantArgs);
	InitFunctionCallInfoData(*fcinfo, flinfo, nargs, InvalidOid, nullptr, nullptr);
	for (int k = 0; k < nargs && k < kMaxTenantArgs; ++k) {
		fcinfo->args[k].value = args[k];
		fcinfo->args[k].isnull = null_if_zero && args[k] == 0;
	}
	Datum res = FunctionCallInvoke(fcinfo);
	*isnull = fcinfo->isnull;
	LeaveRunAs(pass->cfg, &pass->clock, &r);
	return res;
}

// The function a stored signature names now (sbpg._resolve_function), or InvalidOid.
Oid
ResolveFunction(const char *signature) {
	if (!signature)
		return InvalidOid;
	Oid types[1] = {TEXTOID};
	Datum args[1] = {CStringGetTextDatum(signature)};
	spi::SpiResult r = spi::ExecSql("look up a function", "SELECT sbpg._resolve_function($1) AS fn", 1, types, args,
	                                nullptr, SPI_OK_SELECT, 1);
	return r.rows == 1 ? r.ObjectId(0, r.Col("fn")) : InvalidOid;
}

Oid
FunctionOwner(Oid fn) {
	HeapTuple tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	if (!HeapTupleIsValid(tup))
		return InvalidOid;
	Oid owner = reinterpret_cast<Form_pg_proc>(GETSTRUCT(tup))->proowner;
	ReleaseSysCache(tup);
	return owner;
}

bool
IsSecurityDefiner(Oid fn) {
	HeapTuple tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	if (!HeapTupleIsValid(tup))
		return false;
	bool secdef = reinterpret_cast<Form_pg_proc>(GETSTRUCT(tup))->prosecdef;
	ReleaseSysCache(tup);
	return secdef;
}

// The handler's own checks (the roles are checked by HandlerUsable first); false fills why.
// *set_based says whether it takes the batch, (sbpg.message[]).
bool
HandlerFunctionUsable(const SubConfig *cfg, ErrorText *why, bool *set_based) {
	*set_based = false;
	HeapTuple tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(cfg->handler));
	if (HeapTupleIsValid(tup)) {
		Form_pg_proc proc = reinterpret_cast<Form_pg_proc>(GETSTRUCT(tup));
		Oid arg = proc->pronargs == 1 ? proc->proargtypes.values[0] : InvalidOid;
		*set_based = OidIsValid(arg) && arg == get_array_type(cfg->message_type);
		bool shape_ok = proc->prokind == PROKIND_FUNCTION && (arg == cfg->message_type || *set_based) &&
		                proc->prorettype == VOIDOID && !proc->proretset;
		ReleaseSysCache(tup);
		if (!shape_ok) {
			FormatText(why, "handler %s is no longer a function (sbpg.message) or (sbpg.message[]) RETURNS void",
			           format_procedure(cfg->handler));
			return false;
		}
	}
	Oid admin = get_role_oid("sbpg_admin", true);
	if (OidIsValid(admin) && !superuser_arg(cfg->run_as) && has_privs_of_role(cfg->run_as, admin)) {
		FormatText(why,
		           "run_as role %s has the privileges of sbpg_admin; code that messages drive must not manage sbpg",
		           cfg->run_as_name);
		return false;
	}
	if (IsSecurityDefiner(cfg->handler)) {
		FormatText(why, "handler %s is SECURITY DEFINER and would run as its owner, not as %s",
		           format_procedure(cfg->handler), cfg->run_as_name);
		return false;
	}
	if (!compat::ProcAclOk(cfg->handler, cfg->run_as, ACL_EXECUTE)) {
		FormatText(why, "run_as role %s may not execute handler %s", cfg->run_as_name, format_procedure(cfg->handler));
		return false;
	}
	return true;
}

Datum
Text(const std::string &s, bool *isnull) {
	*isnull = s.empty();
	return s.empty() ? Datum(0) : PointerGetDatum(cstring_to_text_with_len(s.data(), static_cast<int>(s.size())));
}

// A schema version as the text sbpg.message carries, or NULL.
Datum
VersionText(int version, bool *isnull) {
	*isnull = version <= 0;
	if (*isnull)
		return 0;
	char ver[16];
	snprintf(ver, sizeof ver, "%d", version);
	return CStringGetTextDatum(ver);
}

// The sbpg.message value handed to the handler; body (when not 0) replaces the parsed body, and
// version is the schema version handed on (after upcasts).
Datum
BuildMessage(const Pass *pass, const ReceivedMessage *m, Datum body, int version) {
	Datum v[kMessageAttributes];
	bool n[kMessageAttributes];
	memset(n, 0, sizeof n);
	v[0] = Text(m->message_id, &n[0]);
	v[1] = Text(m->correlation_id, &n[1]);
	v[2] = Text(m->session_id, &n[2]);
	v[3] = Text(m->subject, &n[3]);
	v[4] = Text(m->content_type, &n[4]);
	v[5] = Text(m->reply_to, &n[5]);
	if (body)
		v[6] = body;
	else if (m->json == JsonVerdict::Json)
		v[6] = DirectFunctionCall1(jsonb_in, CStringGetDatum(m->raw_body.c_str()));
	else
		n[6] = true;
	if (m->body_kind == BodyKind::None) {
		n[7] = true;
	} else {
		bytea *raw = static_cast<bytea *>(palloc(VARHDRSZ + m->raw_body.size()));
		SET_VARSIZE(raw, VARHDRSZ + m->raw_body.size());
		memcpy(VARDATA(raw), m->raw_body.data(), m->raw_body.size());
		v[7] = PointerGetDatum(raw);
	}
	v[8] = DirectFunctionCall1(jsonb_in, CStringGetDatum(m->properties_json.c_str()));
	v[9] = Int64GetDatum(m->sequence_number);
	n[9] = !m->has_sequence_number;
	if (m->enqueued_ms > 0) {
		TimestampTz ts = static_cast<TimestampTz>(m->enqueued_ms) * 1000 -
		                 static_cast<TimestampTz>(POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY *
		                     USECS_PER_SEC;
		v[10] = TimestampTzGetDatum(ts);
	} else {
		n[10] = true;
	}
	v[11] = Int32GetDatum(static_cast<int32>(m->delivery_count));
	v[12] = Text(m->message_type, &n[12]);
	v[13] = VersionText(version, &n[13]);
	v[14] = CStringGetTextDatum(pass->cfg->name);
	v[15] = VersionText(m->schema_version, &n[15]);
	v[16] = Text(m->traceparent, &n[16]);
	HeapTuple t = heap_form_tuple(pass->message_desc, v, n);
	return HeapTupleGetDatum(t);
}

// Runs one upcast, (jsonb) RETURNS jsonb, as run_as in the handler's restricted context.
//
// An upcast is chosen by the message type's owner, not by the subscription's: it runs only when
// its owner could act as run_as anyway (a member of run_as, or a superuser), so no team's code
// ever runs with another team's rights (docs/security.md).
Datum
CallUpcast(Pass *pass, Oid fn, Datum body) {
	const SubConfig *cfg = pass->cfg;
	HeapTuple tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	if (!HeapTupleIsValid(tup))
		ereport(ERROR, (errcode(ERRCODE_UNDEFINED_FUNCTION), errmsg("upcast (oid %u) no longer exists", fn)));
	Form_pg_proc proc = reinterpret_cast<Form_pg_proc>(GETSTRUCT(tup));
	Oid owner = proc->proowner;
	bool shape_ok = proc->prokind == PROKIND_FUNCTION && proc->pronargs == 1 &&
	                proc->proargtypes.values[0] == JSONBOID && proc->prorettype == JSONBOID && !proc->proretset;
	bool definer = proc->prosecdef;
	ReleaseSysCache(tup);
	if (!shape_ok)
		ereport(ERROR, (errcode(ERRCODE_INVALID_FUNCTION_DEFINITION),
		                errmsg("upcast %s is no longer a function (jsonb) RETURNS jsonb", format_procedure(fn))));
	if (definer)
		ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
		                errmsg("upcast %s is SECURITY DEFINER and would run as its owner", format_procedure(fn))));
	if (!superuser_arg(owner) && !has_privs_of_role(owner, cfg->run_as))
		ereport(ERROR,
		        (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
		         errmsg("upcast %s is owned by %s, who may not act as run_as role %s", format_procedure(fn),
		                GetUserNameFromId(owner, false), cfg->run_as_name),
		         errdetail("An upcast is chosen by its message type's owner and runs with the subscription's rights."),
		         errhint("GRANT %s TO %s if that role may write what %s writes, or have the upcast owned by a "
		                 "member of %s.",
		                 cfg->run_as_name, GetUserNameFromId(owner, false), cfg->run_as_name, cfg->run_as_name)));
	if (!compat::ProcAclOk(fn, cfg->run_as, ACL_EXECUTE))
		ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
		                errmsg("run_as role %s may not execute upcast %s", cfg->run_as_name, format_procedure(fn)),
		                errhint("GRANT EXECUTE ON FUNCTION %s TO %s.", format_procedure(fn), cfg->run_as_name)));
	FmgrInfo flinfo;
	fmgr_info(fn, &flinfo);
	bool isnull;
	Datum out = CallAsRunAs(pass, &flinfo, 1, &body, false, &isnull);
	if (isnull)
		ereport(ERROR,
		        (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("upcast %s returned NULL", format_procedure(fn))));
	return out;
}

constexpr spi::PlanSpec kUpcastChain = {
    "read sbpg.schemas",
    "SELECT version, sbpg._resolve_function(upcast) AS upcast, upcast AS upcast_name FROM sbpg.schemas "
    "WHERE message_type" OP_EQ "$1 AND version" OP_GE "$2 ORDER BY version USING" OP_LT,
    2,
    {TEXTOID, INT4OID},
    false,
};

// Brings a validated body from the version it carried towards the newest version: the upcast
// registered with each later version turns the version before it into its shape; a version
// without one is a gap that ends the chain (docs/schemas.md). Returns the version handed on;
// *body holds the result.
int
Upcast(Pass *pass, const ReceivedMessage *m, Datum *body) {
	if (!pass->cfg->validate_schemas || m->message_type.empty() || m->schema_version <= 0 ||
	    m->schema_version >= m->latest_version || m->json != JsonVerdict::Json)
		return m->schema_version; // already the newest shape: no catalog lookup for it
	Datum args[2] = {CStringGetTextDatum(m->message_type.c_str()), Int32GetDatum(m->schema_version)};
	spi::SpiResult res = spi::Exec(kUpcastChain, args, nullptr, SPI_OK_SELECT);
	int n = static_cast<int>(res.rows);
	if (n <= 1)
		return m->schema_version;
	int version_col = res.Col("version"), upcast_col = res.Col("upcast"), name_col = res.Col("upcast_name");
	int *versions = static_cast<int *>(palloc(sizeof(int) * n));
	Oid *fns = static_cast<Oid *>(palloc(sizeof(Oid) * n));
	for (int i = 0; i < n; ++i) {
		versions[i] = res.Int32(i, version_col);
		fns[i] = res.ObjectId(i, upcast_col);
		const char *name = res.Text(i, name_col);
		// A named upcast that is gone is an error, not a gap: the handler would get an older shape.
		if (name && !OidIsValid(fns[i]))
			ereport(ERROR, (errcode(ERRCODE_UNDEFINED_FUNCTION),
			                errmsg("upcast %s of message type %s version %d does not exist", name,
			                       m->message_type.c_str(), versions[i]),
			                errhint("Attach it again with sbpg.set_upcast.")));
	}
	int version = m->schema_version;
	if (versions[0] != version)
		return version;
	Datum b = DirectFunctionCall1(jsonb_in, CStringGetDatum(m->raw_body.c_str()));
	for (int i = 1; i < n && OidIsValid(fns[i]); ++i) {
		b = CallUpcast(pass, fns[i], b);
		version = versions[i];
	}
	*body = b;
	return version;
}

const Mapping *
FindMapping(const Pass *pass, const ReceivedMessage *m) {
	for (int i = 0; i < pass->nmappings && !m->message_type.empty(); ++i)
		if (strcmp(pass->mappings[i].message_type, m->message_type.c_str()) == 0)
			return &pass->mappings[i];
	return nullptr;
}

// Applies the message through the declarative mapping of its type, if the subscription has one (as
// run_as, in the handler's restricted context), and returns true.
bool
ApplyMapping(Pass *pass, ApplyItem *it, Datum body) {
	const ReceivedMessage *m = it->msg;
	const Mapping *mp = FindMapping(pass, m);
	if (!mp)
		return false;
	if (!body && m->json == JsonVerdict::Json)
		body = DirectFunctionCall1(jsonb_in, CStringGetDatum(m->raw_body.c_str()));
	FmgrInfo flinfo;
	fmgr_info(pass->apply_mapping_fn, &flinfo);
	Datum args[5] = {mp->target, mp->action, mp->keys, mp->column_map, body};
	bool isnull;
	it->in_mapping = true; // stays set if the mapping raises: its failure is a MappingError
	(void)CallAsRunAs(pass, &flinfo, 5, args, true, &isnull);
	it->in_mapping = false;
	return true;
}

constexpr spi::PlanSpec kMappings = {
    "read sbpg.mappings",
    "SELECT message_type, target::pg_catalog.oid AS target, action, key_columns, column_map, "
    "'sbpg._apply_mapping(pg_catalog.regclass, pg_catalog.text, pg_catalog.text[], pg_catalog.jsonb, "
    "pg_catalog.jsonb)'::pg_catalog.regprocedure::pg_catalog.oid AS apply_fn, "
    "'sbpg._diagnose_mapping(pg_catalog.regclass, pg_catalog.jsonb, pg_catalog.jsonb)'::pg_catalog.regprocedure"
    "::pg_catalog.oid AS diagnose_fn FROM sbpg.mappings WHERE subscription" OP_EQ "$1",
    1,
    {TEXTOID},
    false,
};

} // namespace

bool
HandlerUsable(Pass *pass, ErrorText *why) {
	const SubConfig *cfg = pass->cfg;
	if (!SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(cfg->handler)))
		cfg->handler = ResolveFunction(cfg->handler_name);
	if (!OidIsValid(cfg->handler)) {
		FormatText(why, "handler %s does not exist (dropped or renamed)", cfg->handler_name);
		return false;
	}
	Oid owner = FunctionOwner(cfg->handler);
	if (owner != cfg->handler_owner) {
		FormatText(why,
		           "handler %s is owned by %s, not by %s who owned it when the subscription named it (name it again "
		           "with sbpg.alter_subscription to run it)",
		           cfg->handler_name, GetUserNameFromId(owner, true),
		           OidIsValid(cfg->handler_owner) ? GetUserNameFromId(cfg->handler_owner, true) : "an unknown role");
		return false;
	}
	if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(cfg->run_as))) {
		FormatText(why, "run_as role (oid %u) no longer exists", cfg->run_as);
		return false;
	}
	// Checked again at run time: the role or the function may have changed since the
	// subscription was created.
	if (superuser_arg(cfg->run_as) && !cfg->allow_superuser) {
		FormatText(why,
		           "run_as role %s is a superuser; handlers run with exactly run_as's rights (a superuser may allow it "
		           "with the subscription option allow_superuser_run_as)",
		           cfg->run_as_name);
		return false;
	}
	if (!HandlerFunctionUsable(cfg, why, &pass->set_handler))
		return false;
	fmgr_info_cxt(cfg->handler, &pass->handler, TopTransactionContext);
	MemoryContext old = MemoryContextSwitchTo(TopTransactionContext);
	pass->message_desc = lookup_rowtype_tupdesc_copy(cfg->message_type, -1);
	MemoryContextSwitchTo(old);
	if (pass->message_desc->natts != kMessageAttributes) {
		// The launcher starts no worker for another extension version; this is a type changed by hand.
		FormatText(why,
		           "type sbpg.message has %d attributes where this sbpg module builds %d (is sbpg.message "
		           "the one ALTER EXTENSION sbpg UPDATE made?)",
		           pass->message_desc->natts, kMessageAttributes);
		return false;
	}
	return true;
}

void
LoadMappings(Pass *pass) {
	pass->mappings = nullptr;
	pass->nmappings = 0;
	if (!pass->cfg->validate_schemas) // without a type, no message can be mapped
		return;
	Datum args[1] = {CStringGetTextDatum(pass->cfg->name)};
	spi::SpiResult res = spi::Exec(kMappings, args, nullptr, SPI_OK_SELECT);
	if (res.rows == 0)
		return;
	int type_col = res.Col("message_type"), target_col = res.Col("target"), action_col = res.Col("action");
	int keys_col = res.Col("key_columns"), map_col = res.Col("column_map");
	int apply_col = res.Col("apply_fn"), diagnose_col = res.Col("diagnose_fn");
	MemoryContext old = MemoryContextSwitchTo(TopTransactionContext);
	pass->mappings = static_cast<Mapping *>(palloc0(sizeof(Mapping) * res.rows));
	for (uint64 r = 0; r < res.rows; ++r) {
		bool isnull;
		Mapping *mp = &pass->mappings[pass->nmappings++];
		mp->message_type = res.Text(r, type_col);
		mp->target = ObjectIdGetDatum(res.ObjectId(r, target_col));
		mp->action = datumCopy(res.Value(r, action_col, &isnull), false, -1);
		Datum keys = res.Value(r, keys_col, &isnull);
		mp->keys = isnull ? 0 : datumCopy(keys, false, -1);
		mp->column_map = datumCopy(res.Value(r, map_col, &isnull), false, -1);
		pass->apply_mapping_fn = res.ObjectId(r, apply_col);
		pass->diagnose_mapping_fn = res.ObjectId(r, diagnose_col);
	}
	MemoryContextSwitchTo(old);
}

void
RunTenantCode(Pass *pass, ApplyItem *it) {
	const ReceivedMessage *m = it->msg;
	Datum body = 0;
	it->in_mapping = false;
	pass->clock.message_deadline = GetCurrentTimestamp() + static_cast<int64>(pass->cfg->handler_timeout_ms) * 1000;
	int version = Upcast(pass, m, &body);
	if (!ApplyMapping(pass, it, body)) {
		Datum msg = BuildMessage(pass, m, body, version);
		bool isnull;
		(void)CallAsRunAs(pass, &pass->handler, 1, &msg, false, &isnull);
	}
	pass->clock.message_deadline = 0;
}

bool
HasMapping(const Pass *pass, const ApplyItem *it) {
	return FindMapping(pass, it->msg) != nullptr;
}

void
RunSetHandler(Pass *pass, ApplyItem *const *set, int n) {
	pass->clock.message_deadline = GetCurrentTimestamp() + static_cast<int64>(pass->cfg->handler_timeout_ms) * 1000;
	Datum *rows = static_cast<Datum *>(palloc(sizeof(Datum) * n));
	for (int i = 0; i < n; ++i) {
		const ReceivedMessage *m = set[i]->msg;
		set[i]->in_mapping = false;
		Datum body = 0;
		int version = Upcast(pass, m, &body);
		rows[i] = BuildMessage(pass, m, body, version);
	}
	int16 len;
	bool byval;
	char align;
	get_typlenbyvalalign(pass->cfg->message_type, &len, &byval, &align);
	Datum array = PointerGetDatum(construct_array(rows, n, pass->cfg->message_type, len, byval, align));
	bool isnull;
	(void)CallAsRunAs(pass, &pass->handler, 1, &array, false, &isnull);
	pass->clock.message_deadline = 0;
}

// It evaluates the target's column types (domains and their checks are tenant code), so it runs as
// run_as, and in a subtransaction of its own: whatever goes wrong there (the time limit included)
// only costs the diagnosis.
char *
DiagnoseMapping(Pass *pass, const ApplyItem *it) {
	const ReceivedMessage *m = it->msg;
	const Mapping *mp = FindMapping(pass, m);
	if (!mp || m->json != JsonVerdict::Json || !OidIsValid(pass->diagnose_mapping_fn))
		return nullptr;
	char *what = nullptr;
	ErrorData *e = nullptr;
	bool ok = InSubtransaction(
	    &pass->clock,
	    [&] {
		    Datum payload = DirectFunctionCall1(jsonb_in, CStringGetDatum(m->raw_body.c_str()));
		    FmgrInfo flinfo;
		    fmgr_info(pass->diagnose_mapping_fn, &flinfo);
		    Datum args[3] = {mp->target, mp->column_map, payload};
		    bool isnull;
		    Datum res = CallAsRunAs(pass, &flinfo, 3, args, false, &isnull);
		    if (!isnull)
			    what = TextDatumGetCString(res);
	    },
	    &e);
	if (!ok) {
		(void)RunAsFailed(&pass->clock, e->sqlerrcode);
		FreeErrorData(e);
		return nullptr;
	}
	return what;
}

void
StopRunAsTimers(const TenantClock *clock) {
	if (!clock->deadline)
		return;
	disable_timeout(STATEMENT_TIMEOUT, true);
	if (end_worker_timeout != MAX_TIMEOUTS)
		disable_timeout(end_worker_timeout, false);
	if (get_timeout_indicator(STATEMENT_TIMEOUT, true))
		QueryCancelPending = false;
}

bool
RunAsFailed(TenantClock *clock, int sqlerrcode) {
	ClearApplying(); // the handler call that failed applies nothing any more
	StopRunAsTimers(clock);
	bool timed_out = clock->deadline != 0 && sqlerrcode == ERRCODE_QUERY_CANCELED &&
	                 GetCurrentTimestamp() >= clock->deadline;
	clock->deadline = 0;
	clock->message_deadline = 0;
	tenant_role = InvalidOid;
	return timed_out;
}

bool
EndedByTimeLimit() {
	return ended_by_limit != 0;
}

void
CleanSession() {
	// PostgreSQL refuses the rest of a session's state in a security-restricted operation (SET
	// ROLE, temporary tables, PREPARE, LISTEN, cursors WITH HOLD); settings are restored by
	// LeaveRunAs and other temporary objects refused by sbpg's object-access hook (module.cpp).
	LockReleaseSession(USER_LOCKMETHOD); // session-level advisory locks
}

} // namespace sbpg::pg
