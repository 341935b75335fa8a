/*
 * bench/ceiling/sbpg_bench_ceiling.c: the database ceiling of bench/sbpg.sh, a bench-only module.
 *
 *   CALL sbpg_bench_ceiling(n, batch, handler, run_as, subscription, channel);
 *
 * Does, per message, the database work sbpg's worker does for a message it applies, and nothing
 * else: it parses a JSON body (as received: text, the same shape as the bench's messages) and the
 * application properties into jsonb, forms the same sbpg.message row, calls the handler through
 * fmgr as run_as (user switch, restricted security context, a GUC nest level, as sbpg does),
 * inserts the same sbpg.inbox row through a kept SPI plan, and queues the same kind of NOTIFY
 * payload; a COMMIT every `batch` messages. What it leaves out is what sbpg adds on top: AMQP,
 * the per-batch inbox and retry lookups, the settled_at stamps, the handler's time limit, statistics.
 * So sbpg's rate divided by this one is the share of the database's capacity that sbpg delivers.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/async.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/parsenodes.h"
#include "parser/parse_type.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"
#include "utils/xid8.h"

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(sbpg_bench_ceiling);

#define INBOX_INSERT                                                                                                   \
	"INSERT INTO sbpg.inbox (subscription, sequence_number, message_id, correlation_id, status, reason, "             \
	"delivery_count, xid, attempts, traceparent) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"

static Datum
text_or_null(const char *s, bool *isnull)
{
	*isnull = s == NULL;
	return s ? CStringGetTextDatum(s) : (Datum) 0;
}

Datum
sbpg_bench_ceiling(PG_FUNCTION_ARGS)
{
	int32		n = PG_GETARG_INT32(0);
	int32		batch = PG_GETARG_INT32(1);
	Oid			handler = PG_GETARG_OID(2);
	Oid			run_as = PG_GETARG_OID(3);
	char	   *subscription = text_to_cstring(PG_GETARG_TEXT_PP(4));
	char	   *channel = text_to_cstring(PG_GETARG_TEXT_PP(5));
	bool		nonatomic = fcinfo->context && IsA(fcinfo->context, CallContext) &&
		!castNode(CallContext, fcinfo->context)->atomic;
	MemoryContext keep;
	MemoryContext per_message;
	TupleDesc	desc;
	FmgrInfo	flinfo;
	Oid			types[10] = {TEXTOID, INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, INT4OID, XID8OID, INT4OID, TEXTOID};
	SPIPlanPtr	insert;
	Oid			message_type;
	char		note[61];

	if (n < 0 || batch < 1)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("n must be >= 0 and batch >= 1")));
	if (!nonatomic)
		ereport(ERROR, (errcode(ERRCODE_INVALID_TRANSACTION_TERMINATION),
						errmsg("sbpg_bench_ceiling commits every batch: CALL it outside a transaction block")));
	SPI_connect_ext(SPI_OPT_NONATOMIC);

	/* What lives across the commits. */
	keep = AllocSetContextCreate(TopMemoryContext, "sbpg_bench_ceiling", ALLOCSET_DEFAULT_SIZES);
	per_message = AllocSetContextCreate(keep, "sbpg_bench_ceiling message", ALLOCSET_DEFAULT_SIZES);
	message_type = typenameTypeId(NULL, makeTypeNameFromNameList(list_make2(makeString("sbpg"), makeString("message"))));
	{
		MemoryContext old = MemoryContextSwitchTo(keep);

		desc = lookup_rowtype_tupdesc_copy(message_type, -1);
		fmgr_info_cxt(handler, &flinfo, keep);
		subscription = pstrdup(subscription);
		channel = pstrdup(channel);
		MemoryContextSwitchTo(old);
	}
	insert = SPI_prepare(INBOX_INSERT, 10, types);
	if (!insert || SPI_keepplan(insert) != 0)
		elog(ERROR, "sbpg_bench_ceiling: preparing the inbox insert failed");
	memset(note, 'x', 60);
	note[60] = '\0';

	for (int32 i = 1; i <= n; i++)
	{
		MemoryContext old = MemoryContextSwitchTo(per_message);
		char		message_id[32];
		char	   *body;
		Datum		v[17];
		bool		nl[17];
		Datum		row;
		Oid			save_user;
		int			save_sec;
		int			nest;
		Datum		a[10];
		char		an[10];
		int64		seq = 3000000000LL + i;
		uint64		xid;
		char	   *payload;
		bytea	   *raw;
		size_t		len;

		snprintf(message_id, sizeof message_id, "ceiling-%d", i);
		body = psprintf("{\"id\":%d,\"customer\":\"c%d\",\"amount\":%d,\"note\":\"%s\"}", 2000000 + i, i % 50,
						(i % 90) + 1, note);
		len = strlen(body);

		/* The message, as sbpg's BuildMessage forms it. */
		memset(nl, 0, sizeof nl);
		v[0] = text_or_null(message_id, &nl[0]);
		v[1] = text_or_null(NULL, &nl[1]);
		v[2] = text_or_null(NULL, &nl[2]);
		v[3] = text_or_null(NULL, &nl[3]);
		v[4] = text_or_null(NULL, &nl[4]);
		v[5] = text_or_null(NULL, &nl[5]);
		v[6] = DirectFunctionCall1(jsonb_in, CStringGetDatum(body));
		raw = (bytea *) palloc(VARHDRSZ + len);
		SET_VARSIZE(raw, VARHDRSZ + len);
		memcpy(VARDATA(raw), body, len);
		v[7] = PointerGetDatum(raw);
		v[8] = DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"));
		v[9] = Int64GetDatum(seq);
		v[10] = TimestampTzGetDatum(GetCurrentTimestamp());
		v[11] = Int32GetDatum(0);
		v[12] = text_or_null(NULL, &nl[12]);
		v[13] = text_or_null(NULL, &nl[13]);
		v[14] = CStringGetTextDatum(subscription);
		v[15] = text_or_null(NULL, &nl[15]);
		v[16] = text_or_null(NULL, &nl[16]);
		row = HeapTupleGetDatum(heap_form_tuple(desc, v, nl));

		/* The handler, as run_as. */
		GetUserIdAndSecContext(&save_user, &save_sec);
		nest = NewGUCNestLevel();
		SetUserIdAndSecContext(run_as, save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
		{
			LOCAL_FCINFO(call, 1);

			InitFunctionCallInfoData(*call, &flinfo, 1, InvalidOid, NULL, NULL);
			call->args[0].value = row;
			call->args[0].isnull = false;
			(void) FunctionCallInvoke(call);
		}
		AtEOXact_GUC(false, nest);
		SetUserIdAndSecContext(save_user, save_sec);

		/* The inbox row and the NOTIFY. */
		xid = U64FromFullTransactionId(GetTopFullTransactionId());
		memset(an, ' ', sizeof an);
		a[0] = CStringGetTextDatum(subscription);
		a[1] = Int64GetDatum(seq);
		a[2] = CStringGetTextDatum(message_id);
		a[3] = (Datum) 0;
		an[3] = 'n';
		a[4] = CStringGetTextDatum("applied");
		a[5] = (Datum) 0;
		an[5] = 'n';
		a[6] = Int32GetDatum(0);
		a[7] = FullTransactionIdGetDatum(FullTransactionIdFromU64(xid));
		a[8] = Int32GetDatum(1);
		a[9] = (Datum) 0;
		an[9] = 'n';
		if (SPI_execute_plan(insert, a, an, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "sbpg_bench_ceiling: the inbox insert failed");
		payload = psprintf("{\"subscription\":\"%s\",\"message_id\":\"%s\",\"correlation_id\":null,"
						   "\"sequence_number\":" INT64_FORMAT ",\"traceparent\":null,\"xid\":\"" UINT64_FORMAT "\",\"status\":\"applied\","
						   "\"reason\":null,\"attempts\":1}",
						   subscription, message_id, seq, xid);
		Async_Notify(channel, payload);

		MemoryContextSwitchTo(old);
		MemoryContextReset(per_message);
		if (i % batch == 0 || i == n)
			SPI_commit();
	}
	SPI_freeplan(insert);
	SPI_finish();
	MemoryContextDelete(keep);
	PG_RETURN_VOID();
}
