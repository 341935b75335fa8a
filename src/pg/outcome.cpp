// src/pg/outcome.cpp
//   Outcome records: the status names (the one place they are spelled), the one outcome JSON
//   builder behind both the NOTIFY payload and the worker's log line, and Record, which writes an
//   applied or dead-lettered outcome in the pass's transaction (inbox row, retry row, NOTIFY).
//
//   Invariants: WriteOutcome calls nothing that raises and owns nothing (the worker calls it from
//   C++ frames); a NOTIFY carries reason codes only, never a description; a pass whose NOTIFY queue
//   is nearly full records its outcomes without notifications. The rest runs inside PgGuard and
//   owns no C++ objects with destructors.
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/core/text.hpp"
#include "sbpg/message/message.hpp"

extern "C" {
#include "postgres.h"

#include "commands/async.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
}

#include "sbpg/pg/apply.hpp"
#include "sbpg/pg/inbox.hpp"
#include "sbpg/pg/outcome.hpp"
#include "sbpg/pg/pass.hpp"
#include "sbpg/pg/retry.hpp"
#include "sbpg/pg/test_hooks.hpp"

#include <cstdarg>
#include <cstdio>
#include <cstring>

namespace sbpg::pg {

namespace {

constexpr size_t kNotifyIdMax = 512; // bytes of an id a NOTIFY payload carries

// JSON written piece by piece into a sink.
struct JsonOut {
	OutcomeSink write;
	void *sink;

	void Raw(const char *s) { write(sink, s, strlen(s)); }
	void Raw(const char *s, size_t n) { write(sink, s, n); }
	// The inside of a JSON string holding s[0..n), escaped as PostgreSQL's escape_json does.
	void Escaped(const char *s, size_t n) {
		size_t start = 0; // the bytes from start on are written as they are
		for (size_t i = 0; i < n; ++i) {
			unsigned char c = static_cast<unsigned char>(s[i]);
			const char *esc = nullptr;
			char u[8];
			switch (c) {
			case '"':
				esc = "\\\"";
				break;
			case '\\':
				esc = "\\\\";
				break;
			case '\b':
				esc = "\\b";
				break;
			case '\f':
				esc = "\\f";
				break;
			case '\n':
				esc = "\\n";
				break;
			case '\r':
				esc = "\\r";
				break;
			case '\t':
				esc = "\\t";
				break;
			default:
				if (c < 0x20) {
					snprintf(u, sizeof u, "\\u%04x", c);
					esc = u;
				}
			}
			if (!esc)
				continue;
			Raw(s + start, i - start);
			Raw(esc);
			start = i + 1;
		}
		Raw(s + start, n - start);
	}
	void Str(const char *s, size_t n) {
		Raw("\"", 1);
		Escaped(s, n);
		Raw("\"", 1);
	}
	void Str(const char *s) { Str(s, strlen(s)); }
	void Field(const char *key) {
		Raw(",\"");
		Raw(key);
		Raw("\":");
	}
	// An id: null when empty; cut at max bytes on a character boundary and marked with "…".
	// In a NOTIFY payload (max <= kNotifyIdMax) an id ends at a NUL byte: listeners read the payload
	// as jsonb, which refuses \u0000.
	void Id(const char *key, const std::string &full, size_t max) {
		Field(key);
		std::string_view id(full);
		if (max <= kNotifyIdMax)
			id = id.substr(0, strnlen(full.data(), full.size()));
		if (id.empty()) {
			Raw("null");
			return;
		}
		if (id.size() <= max || max > kNotifyIdMax) {
			Str(id.data(), id.size());
			return;
		}
		size_t keep = Utf8Prefix(id, max);
		char cut[kNotifyIdMax + 4];
		memcpy(cut, id.data(), keep);
		memcpy(cut + keep, "\xE2\x80\xA6", 3); // …
		Str(cut, keep + 3);
	}
	void Int(const char *key, int64 v) {
		char b[32];
		snprintf(b, sizeof b, INT64_FORMAT, v);
		Field(key);
		Raw(b);
	}
};

// Whether the status carries a reason: a dead-letter, a failed attempt, a redelivery of a dead-letter.
bool
HasReason(const ApplyItem &it) {
	return it.status == kDeadLettered || it.status == kTransient ||
	       (it.status == kDuplicate && it.recorded == kDeadLettered);
}

} // namespace

const char *
StatusName(int status) {
	switch (status) {
	case kApplied:
		return "applied";
	case kDeadLettered:
		return "dead_lettered";
	case kDuplicate:
		return "duplicate";
	case kDelayed:
		return "delayed";
	case kBlocked:
		return "blocked";
	default:
		return "retry";
	}
}

void
WriteOutcome(const char *subscription, const ApplyItem &it, uint64 xid, OutcomeFor who, OutcomeSink write, void *sink) {
	const ReceivedMessage &m = *it.msg;
	bool log = who == OutcomeFor::kLog;
	size_t id_max = log ? SIZE_MAX : kNotifyIdMax;
	JsonOut o{write, sink};
	o.Raw(log ? "{\"event\":\"message\",\"subscription\":" : "{\"subscription\":");
	o.Str(subscription);
	o.Id("message_id", m.message_id, id_max);
	o.Id("correlation_id", m.correlation_id, id_max);
	if (m.has_sequence_number)
		o.Int("sequence_number", m.sequence_number);
	else
		o.Raw(",\"sequence_number\":null");
	if (log)
		o.Int("delivery_count", m.delivery_count);
	o.Id("traceparent", m.traceparent, id_max); // null, or 55 characters of hex and "-"
	char b[64];
	snprintf(b, sizeof b, ",\"xid\":\"" UINT64_FORMAT "\"", xid);
	o.Raw(b);
	o.Field("status");
	o.Str(StatusName(it.status));
	o.Field("reason");
	if (!HasReason(it) || it.reason.Empty()) {
		o.Raw("null");
	} else if (!log) {
		o.Str(it.reason.c_str()); // a code: HandlerError, MaxRetriesExceeded, ...
	} else {
		o.Raw("\"", 1); // "Reason: description"
		o.Escaped(it.reason.c_str(), strlen(it.reason.c_str()));
		o.Raw(": ");
		o.Escaped(it.description.c_str(), strlen(it.description.c_str()));
		o.Raw("\"", 1);
	}
	if (it.status == kTransient || it.status == kDelayed) {
		o.Int("attempts", it.attempts);
		o.Field("next_attempt_at");
		const char *at = timestamptz_to_str(it.next_attempt);
		o.Str(at);
		o.Raw(it.defer ? ",\"deferred\":true" : ",\"deferred\":false");
	} else if (it.status == kApplied || it.status == kDeadLettered) {
		o.Int("attempts", it.attempts + 1);
	}
	if (log) {
		snprintf(b, sizeof b, ",\"apply_ms\":%.3f", it.apply_ms);
		o.Raw(b);
	}
	o.Raw("}");
}

void
SetReason(ApplyItem *it, const char *reason, const char *description) {
	it->reason.Set(reason ? reason : "");
	it->description.Set(description ? description : "");
}

void
FormatText(ErrorText *out, const char *fmt, ...) {
	StringInfoData b;
	initStringInfo(&b);
	for (;;) {
		va_list ap;
		va_start(ap, fmt);
		int need = appendStringInfoVA(&b, fmt, ap);
		va_end(ap);
		if (need == 0)
			break;
		enlargeStringInfo(&b, need);
	}
	out->Set(b.data);
	pfree(b.data);
}

void
CheckNotifyQueue(Pass *pass) {
	const SubConfig *cfg = pass->cfg;
	pass->notify = cfg->notify_channel != nullptr;
	if (!pass->notify)
		return;
	LOCAL_FCINFO(fcinfo, 0);
	InitFunctionCallInfoData(*fcinfo, nullptr, 0, InvalidOid, nullptr, nullptr);
	double usage = DatumGetFloat8(pg_notification_queue_usage(fcinfo));
	if (usage > 0.9 || testing::Fires(testing::kNotifyQueueFull)) {
		pass->notify = false;
		ereport(WARNING, (errmsg("sbpg: subscription \"%s\": the NOTIFY queue is %.0f%% full; outcomes are recorded in "
		                         "sbpg.inbox without notifications until it drains",
		                         cfg->name, usage * 100),
		                  errhint("A session that LISTENs and stopped reading holds the queue; "
		                          "pg_stat_activity shows it.")));
	}
}

void
Notify(const Pass *pass, const ApplyItem *it) {
	if (!pass->notify)
		return;
	StringInfoData b;
	initStringInfo(&b);
	WriteOutcome(
	    pass->cfg->name, *it, pass->xid, OutcomeFor::kNotify,
	    [](void *s, const char *text, size_t len) {
		    appendBinaryStringInfo(static_cast<StringInfo>(s), text, static_cast<int>(len));
	    },
	    &b);
	Async_Notify(pass->cfg->notify_channel, b.data);
	pfree(b.data);
}

void
Record(Pass *pass, ApplyItem *it, int status) {
	it->status = status;
	InsertInbox(pass, it);
	if (it->attempts > 0 || it->msg->fetched)
		DeleteRetry(pass->cfg, it);
	Notify(pass, it);
}

} // namespace sbpg::pg
