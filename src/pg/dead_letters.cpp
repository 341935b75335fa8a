// src/pg/dead_letters.cpp
//   sbpg._dead_letter_op(): a subscription's dead-letter queue, read and replayed from SQL (issue
//   16, docs/outbox.md "Dead-letter replay"). It runs in the calling backend: it reads the
//   subscription's endpoint and identity, opens a connection of its own with a Consumer on
//   <entity>/$DeadLetterQueue and, to replay, a Publisher, and waits for them on its latch and an
//   eventfd, answering cancel requests.
//     peek    com.microsoft:peek-message: up to max_count messages from from_sequence on, nothing
//             locked or removed.
//     replay  receives the dead-letter queue (peek-lock) until the chosen messages (by sequence
//             number, or every one whose DeadLetterReason is `reason`) are in hand or it is
//             drained; sends each chosen one to the entity with its body and properties, plus the
//             application property DeadLetterSequenceNumber; completes its dead-letter copy only
//             once the broker accepted the resend; hands the others back (abandon).
//   The SQL wrappers (sbpg.dead_letters, sbpg.replay_dead_letters) check who may call.
//   Boundaries: the C++ objects live in RunOp; every PostgreSQL call in it goes through PgGuard,
//   and an error there (a cancel) is raised only after RunOp's objects are gone.
#include "sbpg/amqp/consumer.hpp"
#include "sbpg/amqp/publisher.hpp"
#include "sbpg/core/fixed_text.hpp"
#include "sbpg/core/json.hpp"
#include "sbpg/core/text.hpp"
#include "sbpg/identity/token.hpp"
#include "sbpg/message/message.hpp"
#include "sbpg/pg/pg_error.hpp"

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <sys/eventfd.h>
#include <unistd.h>

extern "C" {
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"
#include "utils/wait_event.h"

PGDLLEXPORT Datum sbpg_dead_letter_op(PG_FUNCTION_ARGS);
PG_FUNCTION_INFO_V1(sbpg_dead_letter_op);
}

#include "sbpg/pg/config.hpp"
#include "sbpg/pg/connect.hpp"
#include "sbpg/pg/guard.hpp"
#include "sbpg/pg/shared.hpp"
#include "sbpg/pg/spi.hpp"
#include "sbpg/pg/sql_entry.hpp"

namespace sbpg::pg {

namespace {

const char *const kSubSql =
    "SELECT s.namespace, s.entity, s.identity, i.kind AS identity_kind, (i.options" OP_GETTEXT
    "'key_name') AS key_name, "
    "k.secret AS key, (i.options" OP_GETTEXT "'key_file') AS key_file, (i.options" OP_GETTEXT "'key_env') AS key_env, "
    "CAST(i.options AS pg_catalog.text) AS identity_options, "
    "(s.namespace OPERATOR(pg_catalog.~*) '^(amqps://)?[a-z0-9][a-z0-9-]{0,48}[a-z0-9]\\.servicebus\\."
    "(windows\\.net|chinacloudapi\\.cn|usgovcloudapi\\.net|cloudapi\\.de)(:[0-9]{1,5})?/?$' "
    "OR EXISTS (SELECT FROM pg_catalog.jsonb_array_elements_text(i.options OPERATOR(pg_catalog.->) "
    "'allowed_namespaces') a "
    "WHERE pg_catalog.lower(pg_catalog.rtrim(a, '/'))" OP_EQ "pg_catalog.lower(pg_catalog.rtrim(s.namespace, '/')))) "
    "AS token_destination_ok "
    "FROM sbpg.subscriptions s LEFT JOIN sbpg.identities i ON i.name" OP_EQ "s.identity "
    "LEFT JOIN sbpg.identity_secrets k ON k.identity" OP_EQ "s.identity WHERE s.name" OP_EQ "$1";

// What the SQL call asked for (PostgreSQL memory, plain data).
struct OpInput {
	bool replay;
	int64 *seqs; // replay by sequence numbers (nseqs > 0), else by reason
	int nseqs;
	char *reason;
	int max_count;
	int64 from;
	int timeout_ms;
};

// One result row (PostgreSQL memory, plain data), filled by RunOp under PgGuard.
struct OutRow {
	int64 seq;
	char *message_id, *reason, *description, *properties, *session_id, *outcome;
	char *body;
	int body_len;
	int64 enqueued_ms;
	int32 delivery_count;
};

struct Result {
	OutRow *rows;
	int n;
};

// The message as it came, ready to send again: its body and properties, without the broker's
// dead-letter properties, plus DeadLetterSequenceNumber.
bool
Resend(const ReceivedMessage &m, std::string *out, std::string *why) {
	OutgoingMessage o;
	o.message_id = m.message_id;
	o.body = m.raw_body;
	o.content_type = m.content_type;
	o.correlation_id = m.correlation_id;
	o.session_id = m.session_id;
	o.subject = m.subject;
	o.reply_to = m.reply_to;
	rapidjson::Document d;
	d.Parse(m.properties_json.c_str(), m.properties_json.size());
	rapidjson::Document keep(rapidjson::kObjectType);
	if (!d.HasParseError() && d.IsObject()) {
		for (auto it = d.MemberBegin(); it != d.MemberEnd(); ++it) {
			std::string k(it->name.GetString(), it->name.GetStringLength());
			if (k == "DeadLetterReason" || k == "DeadLetterErrorDescription" || k == "DeadLetterSequenceNumber")
				continue;
			if (it->value.IsObject() || it->value.IsArray())
				continue; // not a simple value (cannot have come as one)
			keep.AddMember(rapidjson::Value(k.c_str(), keep.GetAllocator()),
			               rapidjson::Value(it->value, keep.GetAllocator()), keep.GetAllocator());
		}
	}
	keep.AddMember("DeadLetterSequenceNumber", rapidjson::Value(static_cast<int64_t>(m.sequence_number)),
	               keep.GetAllocator());
	rapidjson::StringBuffer sb;
	rapidjson::Writer<rapidjson::StringBuffer> w(sb);
	keep.Accept(w);
	o.properties_json.assign(sb.GetString(), sb.GetSize());
	return EncodeOutgoing(o, out, why);
}

std::string
Prop(const ReceivedMessage &m, const char *name) {
	rapidjson::Document d;
	d.Parse(m.properties_json.c_str(), m.properties_json.size());
	if (d.HasParseError() || !d.IsObject() || !d.HasMember(name) || !d[name].IsString())
		return "";
	return std::string(d[name].GetString(), d[name].GetStringLength());
}

class Op {
  public:
	Op(const SubConfig &cfg, const OpInput &in) : cfg_(cfg), in_(in) {}
	~Op() {
		if (consumer_)
			consumer_->Stop();
		if (publisher_)
			publisher_->Stop();
		if (tokens_)
			tokens_->Abort();
		if (efd_ >= 0)
			close(efd_);
	}
	// Returns false with *err set (a cancel, or why the broker could not be reached).
	bool Run(Result *res, PgError *err);

  private:
	bool Wait(PgError *err, int64_t deadline);
	bool Setup(PgError *err);
	bool Peek(PgError *err, int64_t deadline);
	bool Replay(PgError *err, int64_t deadline);
	bool Output(Result *res, PgError *err);
	void Fail(PgError *err, const std::string &msg, int code = ERRCODE_CONNECTION_FAILURE) {
		err->sqlerrcode = code;
		err->message.Set(msg);
	}

	const SubConfig &cfg_;
	const OpInput &in_;
	int efd_ = -1;
	std::unique_ptr<TokenSource> tokens_;
	std::unique_ptr<Consumer> consumer_;
	std::unique_ptr<Publisher> publisher_;
	ConsumerConfig cc_;
	struct Row {
		ReceivedMessage m;
		std::string outcome;
	};
	std::vector<Row> rows_;
};

bool
Op::Wait(PgError *err, int64_t deadline) {
	long timeout = std::max<long>(1, std::min<long>(100, deadline - WallMs()));
	bool ok = PgGuard(
	    [&] {
		    (void)WaitLatchOrSocket(MyLatch, WL_LATCH_SET | WL_SOCKET_READABLE | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, efd_,
		                            timeout, PG_WAIT_EXTENSION);
		    ResetLatch(MyLatch);
		    CHECK_FOR_INTERRUPTS();
	    },
	    err);
	uint64_t drained;
	while (read(efd_, &drained, sizeof drained) > 0) {
	}
	return ok;
}

bool
Op::Setup(PgError *err) {
	Endpoint ep = ParseNamespace(cfg_.namespace_);
	if (!ep.error.empty()) {
		Fail(err, ep.error, ERRCODE_INVALID_PARAMETER_VALUE);
		return false;
	}
	efd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (efd_ < 0) {
		Fail(err, std::string("eventfd: ") + strerror(errno), ERRCODE_SYSTEM_ERROR);
		return false;
	}
	cc_.host = ep.host;
	cc_.port = ep.port;
	cc_.tls = ep.tls;
	cc_.entity = std::string(cfg_.entity) + "/$DeadLetterQueue";
	cc_.audience = Audience(cfg_, ep, cfg_.entity); // the entity's token covers its dead-letter queue
	cc_.prefetch = in_.replay ? static_cast<uint32_t>(std::min(in_.max_count, 1000)) : 0;
	cc_.container_id = "sbpg-dead-letters-" + NewGuid().substr(0, 8);
	cc_.extra_ca_file = guc_ca_file ? guc_ca_file : "";
	cc_.sessions = ConsumerConfig::Sessions::Off; // a dead-letter queue has no sessions
	cc_.max_lock_renewal_ms = 600000;
	cc_.reconnect_max_ms = 2000;
	std::string why;
	if (!SetupAuth(cfg_, cc_.extra_ca_file, efd_, &cc_, &tokens_, &why)) {
		Fail(err, why, ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION);
		return false;
	}
	if (cc_.auth == ConsumerConfig::Auth::Anonymous)
		cc_.management = true; // peek and replay need $management; plain brokers refuse, and say so
	consumer_.reset(new Consumer(cc_, efd_));
	if (tokens_)
		tokens_->Start();
	consumer_->Start();
	return true;
}

bool
Op::Peek(PgError *err, int64_t deadline) {
	bool asked = false;
	while (WallMs() < deadline) {
		ConsumerStatus st = consumer_->Status();
		if (st.management_failed) {
			Fail(err, "the broker has no $management node for " + cc_.entity + ": it cannot peek");
			return false;
		}
		if (!asked && st.management_ready) {
			consumer_->Peek(in_.from, in_.max_count);
			asked = true;
		}
		if (asked) {
			std::vector<ReceivedMessage> got;
			std::string error;
			if (consumer_->TakePeeked(&got, &error)) {
				if (!error.empty()) {
					Fail(err, "peek on " + cc_.entity + " failed: " + error);
					return false;
				}
				for (auto &m : got)
					rows_.push_back({std::move(m), "peeked"});
				return true;
			}
		}
		if (!Wait(err, deadline))
			return false;
	}
	Fail(err, "no answer from " + cc_.host + " within the time allowed; last error: " + consumer_->Status().last_error);
	return false;
}

bool
Op::Replay(PgError *err, int64_t deadline) {
	std::set<int64_t> wanted(in_.seqs, in_.seqs + in_.nseqs);
	std::string reason = in_.reason ? in_.reason : "";
	// 1. Receive until the chosen ones are in hand, the queue is drained (no message for 2 s once
	//    receiving), or max_count is reached.
	std::vector<ReceivedMessage> chosen, others;
	int64_t quiet_since = 0;
	std::set<int64_t> seen;
	while (WallMs() < deadline) {
		ConsumerStatus st = consumer_->Status();
		std::vector<ReceivedMessage> got;
		consumer_->TakeMessages(&got, 1000);
		for (auto &m : got) {
			if (!m.has_sequence_number || !seen.insert(m.sequence_number).second) {
				others.push_back(std::move(m));
				continue;
			}
			bool pick = in_.nseqs > 0 ? wanted.count(m.sequence_number) != 0 : Prop(m, "DeadLetterReason") == reason;
			if (pick && static_cast<int>(chosen.size()) < in_.max_count)
				chosen.push_back(std::move(m));
			else
				others.push_back(std::move(m));
		}
		if (!got.empty() || !st.connected)
			quiet_since = st.connected ? WallMs() : 0;
		else if (!quiet_since)
			quiet_since = WallMs();
		bool all_found = in_.nseqs > 0 && chosen.size() == wanted.size();
		if (all_found || static_cast<int>(chosen.size()) >= in_.max_count ||
		    (quiet_since && WallMs() - quiet_since > 2000))
			break;
		if (!Wait(err, deadline))
			return false;
	}
	// Hand back what was not chosen.
	std::vector<Settlement> back;
	for (auto &m : others)
		back.push_back({m.delivery_id, m.connection_gen, Outcome::Abandon, "", ""});
	if (!back.empty())
		consumer_->Settle(std::move(back));
	if (chosen.empty())
		return true;
	// 2. Send each chosen one back to the entity, on a connection of its own.
	PublisherConfig pc;
	pc.conn = cc_;
	pc.conn.audience = cc_.audience;
	pc.conn.container_id = cc_.container_id + "-send";
	publisher_.reset(new Publisher(pc, efd_));
	publisher_->Start();
	OutgoingGroup g;
	g.entity = cfg_.entity;
	std::map<int64_t, size_t> index; // sequence number -> row
	for (auto &m : chosen) {
		std::string enc, why;
		size_t k = rows_.size();
		rows_.push_back({m, ""});
		if (!Resend(m, &enc, &why)) {
			rows_[k].outcome = "not sent: " + why;
			continue;
		}
		index[m.sequence_number] = k;
		g.items.push_back({m.sequence_number, std::move(enc)});
	}
	size_t expected = g.items.size();
	publisher_->Send(std::move(g));
	std::vector<SendResult> results;
	while (results.size() < expected && WallMs() < deadline) {
		publisher_->TakeResults(&results);
		if (results.size() >= expected)
			break;
		if (!Wait(err, deadline))
			return false;
	}
	// 3. Complete the dead-letter copy of each one the broker accepted; abandon the others.
	std::vector<Settlement> settle;
	std::map<uint64_t, size_t> by_delivery;
	for (auto &r : results) {
		size_t k = index[r.id];
		const ReceivedMessage &m = rows_[k].m;
		if (r.kind == SendResult::Kind::Accepted) {
			settle.push_back({m.delivery_id, m.connection_gen, Outcome::Complete, "", ""});
			by_delivery[m.delivery_id] = k;
			rows_[k].outcome = "replayed";
		} else {
			settle.push_back({m.delivery_id, m.connection_gen, Outcome::Abandon, "", ""});
			rows_[k].outcome = "not sent: " + r.error;
		}
		index.erase(r.id);
	}
	for (auto &kv : index)
		rows_[kv.second].outcome = "not sent: no answer from the broker in time";
	consumer_->Settle(std::move(settle));
	size_t confirmed = 0;
	int64_t settle_deadline = std::min<int64_t>(deadline, WallMs() + 30000);
	while (confirmed < by_delivery.size() && WallMs() < settle_deadline) {
		std::vector<SettleResult> sr;
		consumer_->TakeResults(&sr);
		for (auto &r : sr) {
			auto f = by_delivery.find(r.delivery_id);
			if (f == by_delivery.end())
				continue;
			++confirmed;
			if (!r.ok)
				rows_[f->second].outcome = "replayed; the dead-letter copy was not removed: " + r.error;
		}
		if (confirmed >= by_delivery.size())
			break;
		if (!Wait(err, settle_deadline))
			return false;
	}
	return true;
}

// Copies the rows into PostgreSQL memory (under PgGuard: no C++ object is created in it).
bool
Op::Output(Result *res, PgError *err) {
	return PgGuard(
	    [&] {
		    res->n = static_cast<int>(rows_.size());
		    res->rows = static_cast<OutRow *>(palloc0(sizeof(OutRow) * (rows_.size() + 1)));
		    auto dup = [](const std::string &s) { return s.empty() ? nullptr : pstrdup(s.c_str()); };
		    for (size_t i = 0; i < rows_.size(); ++i) {
			    const ReceivedMessage &m = rows_[i].m;
			    OutRow &o = res->rows[i];
			    o.seq = m.sequence_number;
			    o.message_id = dup(m.message_id);
			    o.session_id = dup(m.session_id);
			    o.properties = pstrdup(m.properties_json.c_str());
			    o.body_len = static_cast<int>(m.raw_body.size());
			    o.body = static_cast<char *>(palloc(o.body_len + 1));
			    memcpy(o.body, m.raw_body.data(), o.body_len);
			    o.enqueued_ms = m.enqueued_ms;
			    o.delivery_count = static_cast<int32>(m.delivery_count);
			    o.outcome = dup(rows_[i].outcome);
		    }
	    },
	    err);
}

bool
Op::Run(Result *res, PgError *err) {
	int64_t deadline = WallMs() + in_.timeout_ms;
	if (!Setup(err))
		return false;
	if (!(in_.replay ? Replay(err, deadline) : Peek(err, deadline)))
		return false;
	// The reason and description come from the message's own properties.
	if (!Output(res, err))
		return false;
	for (size_t i = 0; i < rows_.size(); ++i) {
		std::string r = Prop(rows_[i].m, "DeadLetterReason"), d = Prop(rows_[i].m, "DeadLetterErrorDescription");
		PgGuard(
		    [&] {
			    res->rows[i].reason = r.empty() ? nullptr : pstrdup(r.c_str());
			    res->rows[i].description = d.empty() ? nullptr : pstrdup(d.c_str());
		    },
		    err);
	}
	return true;
}

// Runs the operation with every C++ object inside; returns with *err set on failure.
bool
RunOp(const SubConfig &cfg, const OpInput &in, Result *res, PgError *err) {
	try {
		Op op(cfg, in);
		return op.Run(res, err);
	} catch (const std::exception &e) {
		err->sqlerrcode = ERRCODE_INTERNAL_ERROR;
		err->message.Set(e.what());
		return false;
	}
}

Datum
DeadLetterOp(FunctionCallInfo fcinfo) {
	ReturnSetInfo *rsinfo = reinterpret_cast<ReturnSetInfo *>(fcinfo->resultinfo);
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("subscription and operation must be given")));
	char *name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char *op = text_to_cstring(PG_GETARG_TEXT_PP(1));
	OpInput in;
	memset(&in, 0, sizeof in);
	in.replay = strcmp(op, "replay") == 0;
	if (!PG_ARGISNULL(2)) {
		ArrayType *a = PG_GETARG_ARRAYTYPE_P(2);
		Datum *elems;
		bool *nulls;
		deconstruct_array(a, INT8OID, 8, true, TYPALIGN_DOUBLE, &elems, &nulls, &in.nseqs);
		in.seqs = static_cast<int64 *>(palloc(sizeof(int64) * (in.nseqs + 1)));
		for (int i = 0; i < in.nseqs; ++i)
			in.seqs[i] = nulls[i] ? -1 : DatumGetInt64(elems[i]);
	}
	in.reason = PG_ARGISNULL(3) ? nullptr : text_to_cstring(PG_GETARG_TEXT_PP(3));
	in.max_count = PG_ARGISNULL(4) ? 100 : PG_GETARG_INT32(4);
	in.from = PG_ARGISNULL(5) ? 0 : PG_GETARG_INT64(5);
	in.timeout_ms = PG_ARGISNULL(6) ? 60000 : PG_GETARG_INT32(6);

	// The subscription's endpoint and identity, read in this transaction.
	SubConfig cfg;
	memset(&cfg, 0, sizeof cfg);
	if (SPI_connect() != SPI_OK_CONNECT)
		ereport(ERROR, (errmsg("sbpg: SPI_connect failed")));
	Oid types[1] = {TEXTOID};
	Datum args[1] = {CStringGetTextDatum(name)};
	spi::SpiResult r = spi::ExecSql("read sbpg.subscriptions", kSubSql, 1, types, args, nullptr, SPI_OK_SELECT, 1);
	if (r.rows != 1)
		ereport(ERROR, (errcode(ERRCODE_UNDEFINED_OBJECT), errmsg("subscription \"%s\" does not exist", name)));
	MemoryContext keep = rsinfo->econtext->ecxt_per_query_memory;
	auto text = [&](const char *c) { return r.Text(0, r.Col(c), keep); };
	cfg.name = name;
	cfg.namespace_ = text("namespace");
	cfg.entity = text("entity");
	cfg.identity = text("identity");
	cfg.identity_kind = text("identity_kind");
	cfg.key_name = text("key_name");
	cfg.key = text("key");
	cfg.key_file = text("key_file");
	cfg.key_env = text("key_env");
	cfg.identity_options = text("identity_options");
	cfg.token_destination_ok = r.Bool(0, r.Col("token_destination_ok"));
	SPI_finish();

	Result res{nullptr, 0};
	PgError err;
	if (!RunOp(cfg, in, &res, &err))
		ReportSqlError("sbpg._dead_letter_op()", err);

	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i < res.n; ++i) {
		const OutRow &o = res.rows[i];
		Datum v[10];
		bool n[10] = {false};
		v[0] = Int64GetDatum(o.seq);
		n[1] = !o.message_id;
		v[1] = o.message_id ? CStringGetTextDatum(o.message_id) : 0;
		n[2] = !o.reason;
		v[2] = o.reason ? CStringGetTextDatum(o.reason) : 0;
		n[3] = !o.description;
		v[3] = o.description ? CStringGetTextDatum(o.description) : 0;
		n[4] = o.enqueued_ms == 0;
		v[4] = TimestampTzGetDatum(static_cast<TimestampTz>(o.enqueued_ms) * 1000 -
		                           static_cast<TimestampTz>(POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY *
		                               USECS_PER_SEC);
		v[5] = Int32GetDatum(o.delivery_count);
		bytea *b = static_cast<bytea *>(palloc(VARHDRSZ + o.body_len));
		SET_VARSIZE(b, VARHDRSZ + o.body_len);
		memcpy(VARDATA(b), o.body, o.body_len);
		v[6] = PointerGetDatum(b);
		v[7] = DirectFunctionCall1(jsonb_in, CStringGetDatum(o.properties));
		n[8] = !o.session_id;
		v[8] = o.session_id ? CStringGetTextDatum(o.session_id) : 0;
		n[9] = !o.outcome;
		v[9] = o.outcome ? CStringGetTextDatum(o.outcome) : 0;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, n);
	}
	return (Datum)0;
}

} // namespace

} // namespace sbpg::pg

Datum
sbpg_dead_letter_op(PG_FUNCTION_ARGS) {
	return sbpg::pg::SqlEntry("sbpg._dead_letter_op()", fcinfo, sbpg::pg::DeadLetterOp);
}
