// test/sbemu/tests/sbemu_protocol_test.cpp
//   Protocol-level tests of sbemu with a Proton C++ client, for what the Azure SDK does not
//   exercise: token expiry and renewal on a live connection, the CBS grace period, SASL PLAIN,
//   TLS with a test CA, settlement outcomes sent through Proton's C API, drain, size limits and
//   every injected fault. Each test starts its own sbemu.
#include "../../lib/harness.hpp"

#include <proton/annotation_key.hpp>
#include <proton/connection.hpp>
#include <proton/connection_options.hpp>
#include <proton/container.hpp>
#include <proton/delivery.hpp>
#include <proton/disposition.h>
#include <proton/codec.h>
#include <proton/condition.h>
#include <proton/error_condition.hpp>
#include <proton/message.hpp>
#include <proton/message_id.hpp>
#include <proton/messaging_handler.hpp>
#include <proton/receiver.hpp>
#include <proton/receiver_options.hpp>
#include <proton/scalar.hpp>
#include <proton/sender.hpp>
#include <proton/sender_options.hpp>
#include <proton/source_options.hpp>
#include <proton/ssl.hpp>
#include <proton/target_options.hpp>
#include <proton/tracker.hpp>
#include <proton/transport.hpp>
#include <proton/work_queue.hpp>

#include <deque>
#include <functional>
#include <future>
#include <map>
#include <thread>
#include <set>

using harness::Sbemu;

namespace {

const char kKeyName[] = "RootManageSharedAccessKey";
const char kKey[] = "SAS_KEY_VALUE";

// A messaging handler assembled from callbacks, with a $cbs client and a time guard.
class Script : public proton::messaging_handler {
  public:
	std::function<void(proton::container &)> start;
	std::function<void(proton::connection &)> connection_open;
	std::function<void(proton::sender &)> sendable;
	std::function<void(proton::receiver &)> receiver_open;
	std::function<void(proton::receiver &)> receiver_close; // the broker's detach (or close) arrived
	std::function<void(proton::receiver &)> drain_finish;
	std::function<void(proton::delivery &, proton::message &)> message;
	std::function<void(proton::tracker &)> tracker_accept, tracker_reject, tracker_settle;
	std::function<void(proton::delivery &)> delivery_settle;
	// Any error: where ("transport", "connection", "receiver", "sender"), condition name, description.
	std::function<void(const std::string &, const std::string &, const std::string &)> error;

	proton::container *container = nullptr;
	bool done = false;
	bool timed_out = false;
	std::vector<std::string> errors; // "where: name: description"

	// Ends the script: closes the connection, or stops the container when there is none to close.
	void Finish(proton::connection c) {
		done = true;
		if (c && c.active())
			c.close();
		else if (container)
			container->stop();
	}
	void Finish() {
		done = true;
		if (container)
			container->stop();
	}

	// Puts a token on $cbs; cb gets the status code.
	void PutToken(proton::connection &c, const std::string &audience, const std::string &token,
	              const std::string &type, std::function<void(int)> cb) {
		if (!cbs_sender_) {
			cbs_sender_ = c.open_sender("$cbs");
			cbs_receiver_ = c.open_receiver("$cbs", proton::receiver_options().target(
			                                            proton::target_options().address("cbs-reply-1")));
		}
		proton::message m;
		std::string id = "put-" + std::to_string(++cbs_id_);
		m.id(proton::message_id(id));
		m.reply_to("cbs-reply-1");
		m.properties().put("operation", "put-token");
		m.properties().put("type", type);
		m.properties().put("name", audience);
		m.body(token);
		cbs_pending_[id] = std::move(cb);
		cbs_queue_.push_back(m);
		FlushCbs();
	}

	void on_container_start(proton::container &c) override {
		if (start)
			start(c);
	}
	void on_connection_open(proton::connection &c) override {
		if (connection_open)
			connection_open(c);
	}
	void on_sendable(proton::sender &s) override {
		if (s == cbs_sender_) {
			FlushCbs();
			return;
		}
		if (sendable)
			sendable(s);
	}
	void on_receiver_open(proton::receiver &r) override {
		if (r == cbs_receiver_)
			return;
		if (receiver_open)
			receiver_open(r);
	}
	void on_receiver_close(proton::receiver &r) override {
		if (r == cbs_receiver_)
			return;
		if (receiver_close)
			receiver_close(r);
	}
	void on_receiver_drain_finish(proton::receiver &r) override {
		if (drain_finish)
			drain_finish(r);
	}
	void on_message(proton::delivery &d, proton::message &m) override {
		if (d.receiver() == cbs_receiver_) {
			std::string corr = proton::to_string(m.correlation_id());
			auto it = cbs_pending_.find(corr);
			int status = proton::get<int32_t>(m.properties().get("status-code"));
			d.accept();
			if (it != cbs_pending_.end()) {
				auto cb = std::move(it->second);
				cbs_pending_.erase(it);
				cb(status);
			}
			return;
		}
		if (message)
			message(d, m);
	}
	void on_tracker_accept(proton::tracker &t) override {
		if (tracker_accept)
			tracker_accept(t);
	}
	void on_tracker_reject(proton::tracker &t) override {
		if (tracker_reject)
			tracker_reject(t);
	}
	void on_tracker_settle(proton::tracker &t) override {
		if (tracker_settle)
			tracker_settle(t);
	}
	void on_delivery_settle(proton::delivery &d) override {
		if (delivery_settle)
			delivery_settle(d);
		d.settle();
	}
	void on_transport_error(proton::transport &t) override { Report("transport", t.error()); }
	void on_connection_error(proton::connection &c) override { Report("connection", c.error()); }
	void on_session_error(proton::session &s) override { Report("session", s.error()); }
	void on_receiver_error(proton::receiver &r) override { Report("receiver", r.error()); }
	void on_sender_error(proton::sender &s) override { Report("sender", s.error()); }
	void on_error(const proton::error_condition &e) override { Report("other", e); }

  private:
	void Report(const std::string &where, const proton::error_condition &e) {
		errors.push_back(where + ": " + e.name() + ": " + e.description());
		if (error)
			error(where, e.name(), e.description());
	}
	void FlushCbs() {
		while (!cbs_queue_.empty() && cbs_sender_.credit() > 0) {
			cbs_sender_.send(cbs_queue_.front());
			cbs_queue_.pop_front();
		}
	}
	proton::sender cbs_sender_;
	proton::receiver cbs_receiver_;
	int cbs_id_ = 0;
	std::map<std::string, std::function<void(int)>> cbs_pending_;
	std::deque<proton::message> cbs_queue_;
};

// Runs the script until it finishes, on a thread of its own; the deadline only guards against a
// hang (the container is stopped and the test fails).
void
Run(Script &s, int timeout_ms = 20000) {
	proton::container c(s);
	s.container = &c;
	std::promise<void> finished;
	std::future<void> fut = finished.get_future();
	std::thread t([&] {
		try {
			c.run();
		} catch (const std::exception &e) {
			s.errors.push_back(std::string("container: ") + e.what());
		}
		finished.set_value();
	});
	if (fut.wait_for(std::chrono::milliseconds(timeout_ms)) != std::future_status::ready) {
		s.timed_out = true;
		c.stop();
	}
	t.join();
	if (s.timed_out) {
		std::string errs;
		for (auto &e : s.errors)
			errs += " [" + e + "]";
		tap::Fail(__FILE__, __LINE__, "script timed out" + errs);
	}
}

proton::connection_options
Anonymous() {
	proton::connection_options o;
	o.sasl_allowed_mechs("ANONYMOUS");
	return o;
}

proton::connection_options
Plain(const std::string &user = kKeyName, const std::string &password = kKey) {
	proton::connection_options o;
	o.sasl_allow_insecure_mechs(true);
	o.sasl_allowed_mechs("PLAIN");
	o.user(user);
	o.password(password);
	return o;
}

proton::receiver_options
PeekLock(int credit = 10) {
	return proton::receiver_options().auto_accept(false).credit_window(credit);
}

// Sets rcv-settle-mode second on a receiver before its attach goes out.
void
SecondMode(proton::receiver r) {
	pn_link_set_rcv_settle_mode(harness::LinkAccess::Get(r), PN_RCV_SECOND);
}

// Accepts a delivery without settling it: with rcv-settle-mode second the broker settles first,
// and on_delivery_settle reports its answer. (Proton C++'s delivery::accept() settles at once.)
void
AcceptUnsettled(proton::delivery &d) {
	pn_delivery_update(harness::DeliveryAccess::Get(d), PN_ACCEPTED);
}

std::string
Audience(const Sbemu &emu, const std::string &entity) {
	return "sb://" + emu.hostport() + "/" + entity;
}

void
SendText(Sbemu &emu, const std::string &entity, const std::string &body, const std::string &query = "") {
	emu.Post("/entities/" + harness::UrlEncode(entity) + "/messages" + query, body);
}

const char kSessionQueue[] =
    R"({"UserConfig":{"Namespaces":[{"Name":"ns","Queues":[{"Name":"sq","Properties":{"RequiresSession":true}}]}]}})";

// A receiver for a session queue: `session` names the session, or null for the next available one.
proton::receiver_options
SessionReceiver(const proton::value &session, int credit = 10) {
	proton::source::filter_map f;
	f.put(proton::symbol("com.microsoft:session-filter"), session);
	return PeekLock(credit).source(proton::source_options().filters(f));
}

// Sends raw bytes as one delivery on a sender (for payloads a proton::message cannot express).
void
SendRaw(proton::sender &snd, const std::string &bytes) {
	pn_link_t *l = harness::LinkAccess::Get(snd);
	pn_delivery(l, pn_dtag("raw", 3));
	pn_link_send(l, bytes.data(), bytes.size());
	pn_link_advance(l);
}

} // namespace

// ---------------------------------------------------------------------------------------------

TEST("tokens: an expiring token detaches the entity's links with amqp:unauthorized-access") {
	Sbemu emu({"--queue", "q"});
	Script s;
	std::string detach;
	int status = 0;
	s.start = [&](proton::container &c) { c.connect(emu.url(), Anonymous()); };
	s.connection_open = [&](proton::connection &c) {
		std::string tok = harness::SasToken(Audience(emu, "q"), kKeyName, kKey, harness::NowUnix() + 2);
		s.PutToken(c, Audience(emu, "q"), tok, "servicebus.windows.net:sastoken", [&, c](int st) mutable {
			status = st;
			SecondMode(c.open_receiver("q", PeekLock()));
		});
	};
	s.error = [&](const std::string &where, const std::string &name, const std::string &) {
		if (where == "receiver") {
			detach = name;
			s.Finish();
		}
	};
	s.receiver_open = [&](proton::receiver &r) { (void)r; };
	Run(s);
	CHECK_EQ(status, 202);
	CHECK_EQ(detach, std::string("amqp:unauthorized-access"));
	CHECK(emu.Log().find("token for q expired") != std::string::npos);
}

TEST("tokens: a token put again before expiry keeps links and locks") {
	Sbemu emu({"--queue", "q"});
	SendText(emu, "q", "held across the renewal");
	Script s;
	std::vector<int> statuses;
	bool settled = false;
	proton::connection conn;
	s.start = [&](proton::container &c) { c.connect(emu.url(), Anonymous()); };
	s.connection_open = [&](proton::connection &c) {
		conn = c;
		std::string tok = harness::SasToken(Audience(emu, "q"), kKeyName, kKey, harness::NowUnix() + 2);
		s.PutToken(c, Audience(emu, "q"), tok, "servicebus.windows.net:sastoken", [&, c](int st) mutable {
			statuses.push_back(st);
			SecondMode(c.open_receiver("q", PeekLock(1)));
		});
	};
	s.message = [&](proton::delivery &d, proton::message &) {
		// Hold the message, renew the token, wait past the first token's expiry, then settle.
		std::string tok = harness::SasToken(Audience(emu, "q"), kKeyName, kKey, harness::NowUnix() + 3600);
		s.PutToken(conn, Audience(emu, "q"), tok, "servicebus.windows.net:sastoken", [&, d](int st) mutable {
			statuses.push_back(st);
			// Runs in the connection's context, so the disposition goes out.
			d.connection().work_queue().schedule(proton::duration(3000), [&, d]() mutable { AcceptUnsettled(d); });
		});
	};
	s.delivery_settle = [&](proton::delivery &) {
		settled = true;
		s.Finish(conn);
	};
	s.error = [&](const std::string &, const std::string &, const std::string &) { s.Finish(conn); };
	Run(s);
	CHECK(statuses == std::vector<int>({202, 202}));
	CHECK(settled);
	CHECK(s.errors.empty());
	CHECK_EQ(emu.Count("q", "completed"), 1);
	CHECK_EQ(emu.Count("q", "lock_lost"), 0);
}

TEST("tokens: a connection that puts no valid token within the grace period is closed") {
	Sbemu emu({"--queue", "q", "--cbs-grace", "1"});
	Script s;
	std::string closed_with;
	s.start = [&](proton::container &c) { c.connect(emu.url(), Anonymous()); };
	s.error = [&](const std::string &where, const std::string &name, const std::string &) {
		if (closed_with.empty())
			closed_with = where + ":" + name;
		s.Finish();
	};
	Run(s);
	CHECK_EQ(closed_with, std::string("connection:amqp:unauthorized-access"));
}

TEST("tokens: a bad token is answered 401 and an unknown entity 404") {
	Sbemu emu({"--queue", "q"});
	Script s;
	std::vector<int> st;
	proton::connection conn;
	s.start = [&](proton::container &c) { c.connect(emu.url(), Anonymous()); };
	s.connection_open = [&](proton::connection &c) {
		conn = c;
		std::string bad = harness::SasToken(Audience(emu, "q"), kKeyName, "not-the-key", harness::NowUnix() + 60);
		s.PutToken(c, Audience(emu, "q"), bad, "servicebus.windows.net:sastoken", [&](int x) { st.push_back(x); });
		std::string nf = harness::SasToken(Audience(emu, "nope"), kKeyName, kKey, harness::NowUnix() + 60);
		s.PutToken(c, Audience(emu, "nope"), nf, "servicebus.windows.net:sastoken", [&](int x) { st.push_back(x); });
		s.PutToken(c, Audience(emu, "q"), "not a jwt", "jwt", [&](int x) {
			st.push_back(x);
			s.Finish(conn);
		});
	};
	Run(s);
	CHECK(st == std::vector<int>({401, 404, 401}));
}

TEST("faults: hold-tokens takes the next put-token and never answers it; the one after is answered") {
	Sbemu emu({"--queue", "q"});
	CHECK(emu.Post("/faults/hold-tokens?count=1").find("\"hold_tokens\":1") != std::string::npos);
	Script s;
	std::vector<std::string> answered;
	proton::connection conn;
	s.start = [&](proton::container &c) { c.connect(emu.url(), Anonymous()); };
	s.connection_open = [&](proton::connection &c) {
		conn = c;
		s.PutToken(c, Audience(emu, "q"), "held", "jwt", [&](int x) { answered.push_back("first " + std::to_string(x)); });
		s.PutToken(c, Audience(emu, "q"), "not a jwt", "jwt", [&](int x) {
			answered.push_back("second " + std::to_string(x));
			s.Finish(conn);
		});
	};
	Run(s);
	CHECK(answered == std::vector<std::string>({"second 401"}));
	CHECK(emu.Get("/stats").find("\"hold_tokens\":0") != std::string::npos);
}

TEST("sasl: PLAIN with a shared access key authorizes the connection; a wrong key is refused") {
	Sbemu emu({"--queue", "q"});
	Script s;
	bool accepted = false, sent = false;
	s.start = [&](proton::container &c) { c.open_sender(emu.url() + "/q", Plain()); };
	s.sendable = [&](proton::sender &snd) {
		if (!sent) {
			sent = true;
			snd.send(proton::message("over PLAIN"));
		}
	};
	s.tracker_accept = [&](proton::tracker &t) {
		accepted = true;
		s.Finish(t.connection());
	};
	Run(s);
	CHECK(accepted);
	CHECK_EQ(emu.Count("q", "active"), 1);

	Script bad;
	std::string err;
	bad.start = [&](proton::container &c) { c.connect(emu.url(), Plain(kKeyName, "wrong")); };
	bad.error = [&](const std::string &where, const std::string &name, const std::string &) {
		if (err.empty())
			err = where + ":" + name;
		bad.Finish();
	};
	Run(bad);
	CHECK_EQ(err, std::string("transport:amqp:unauthorized-access"));
}

TEST("attach: an unknown entity is refused with amqp:not-found, a topic cannot be received from") {
	Sbemu emu({"--queue", "q"}, R"({"UserConfig":{"Namespaces":[{"Name":"ns","Topics":[{"Name":"t","Subscriptions":[{"Name":"s"}]}]}]}})");
	Script s;
	std::vector<std::string> conds;
	proton::connection conn;
	s.start = [&](proton::container &c) { c.connect(emu.url(), Plain()); };
	s.connection_open = [&](proton::connection &c) {
		conn = c;
		c.open_receiver("no-such-queue", PeekLock());
		c.open_receiver("t", PeekLock());
	};
	s.error = [&](const std::string &where, const std::string &name, const std::string &) {
		if (where == "receiver")
			conds.push_back(name);
		if (conds.size() == 2)
			s.Finish(conn);
	};
	Run(s);
	REQUIRE(conds.size() == 2);
	CHECK_EQ(conds[0], std::string("amqp:not-found"));
	CHECK_EQ(conds[1], std::string("amqp:not-allowed"));
}

TEST("deliveries: the delivery tag is the 16-byte lock token and Service Bus annotations are present") {
	Sbemu emu({"--queue", "q"});
	SendText(emu, "q", "annotated");
	Script s;
	size_t tag_size = 0;
	bool seq = false, enq = false, locked = false;
	uint32_t count = 99;
	s.start = [&](proton::container &c) { SecondMode(c.open_receiver(emu.url() + "/q", PeekLock(), Plain())); };
	s.message = [&](proton::delivery &d, proton::message &m) {
		tag_size = d.tag().size();
		auto ann = m.message_annotations();
		seq = ann.exists(proton::annotation_key("x-opt-sequence-number"));
		enq = ann.exists(proton::annotation_key("x-opt-enqueued-time"));
		locked = ann.exists(proton::annotation_key("x-opt-locked-until"));
		count = m.delivery_count();
		AcceptUnsettled(d);
	};
	s.delivery_settle = [&](proton::delivery &d) { s.Finish(d.connection()); };
	Run(s);
	CHECK_EQ(tag_size, 16u);
	CHECK(seq && enq && locked);
	CHECK_EQ(count, 0u);
	CHECK_EQ(emu.Count("q", "completed"), 1);
}

TEST("faults: omit-sequence-numbers leaves x-opt-sequence-number out of one entity's deliveries until cleared") {
	Sbemu emu({"--queue", "q", "--queue", "other"});
	bool refused = false;
	try {
		emu.Post("/faults/omit-sequence-numbers?entity=nosuch");
	} catch (const std::runtime_error &e) {
		refused = std::string(e.what()).find("404") != std::string::npos;
	}
	CHECK(refused);
	std::string stats = emu.Post("/faults/omit-sequence-numbers?entity=q");
	CHECK(stats.find("\"omit_sequence_numbers\":[\"q\"]") != std::string::npos);
	// Which of the three deliveries carried a sequence number, in the order received.
	auto receive = [&](const std::string &entity) {
		SendText(emu, entity, "m");
		Script s;
		int has_seq = -1;
		bool enq = false;
		s.start = [&](proton::container &c) { SecondMode(c.open_receiver(emu.url() + "/" + entity, PeekLock(), Plain())); };
		s.message = [&](proton::delivery &d, proton::message &m) {
			auto ann = m.message_annotations();
			has_seq = ann.exists(proton::annotation_key("x-opt-sequence-number")) ? 1 : 0;
			enq = ann.exists(proton::annotation_key("x-opt-enqueued-time"));
			AcceptUnsettled(d);
		};
		s.delivery_settle = [&](proton::delivery &d) { s.Finish(d.connection()); };
		Run(s);
		CHECK(enq);
		return has_seq;
	};
	CHECK_EQ(receive("q"), 0);
	CHECK_EQ(receive("other"), 1);
	emu.Post("/faults/clear");
	CHECK_EQ(receive("q"), 1);
	CHECK_EQ(emu.Count("q", "completed"), 2);
}

TEST("settlement: rejected with com.microsoft:dead-letter, modified and released map to dead-letter, defer and abandon") {
	Sbemu emu({"--queue", "q"});
	for (const char *b : {"dead", "defer", "release"})
		SendText(emu, "q", b);
	Script s;
	int settled = 0;
	std::set<std::string> seen;
	s.start = [&](proton::container &c) { SecondMode(c.open_receiver(emu.url() + "/q", PeekLock(3), Plain())); };
	s.message = [&](proton::delivery &d, proton::message &m) {
		std::string body = proton::to_string(m.body());
		if (!seen.insert(body).second)
			return; // the released message comes back; leave it locked
		pn_delivery_t *pd = harness::DeliveryAccess::Get(d);
		pn_disposition_t *local = pn_delivery_local(pd);
		if (body.find("dead") != std::string::npos) {
			pn_condition_t *cond = pn_disposition_condition(local);
			pn_condition_set_name(cond, "com.microsoft:dead-letter");
			pn_data_t *info = pn_condition_info(cond);
			pn_data_put_map(info);
			pn_data_enter(info);
			pn_data_put_symbol(info, pn_bytes(16, "DeadLetterReason"));
			pn_data_put_string(info, pn_bytes(14, "ValidationFail"));
			pn_data_put_symbol(info, pn_bytes(26, "DeadLetterErrorDescription"));
			pn_data_put_string(info, pn_bytes(17, "field x is absent"));
			pn_data_exit(info);
			pn_delivery_update(pd, PN_REJECTED);
		} else if (body.find("defer") != std::string::npos) {
			pn_disposition_set_undeliverable(local, true);
			pn_delivery_update(pd, PN_MODIFIED);
		} else {
			pn_delivery_update(pd, PN_RELEASED);
		}
	};
	s.delivery_settle = [&](proton::delivery &d) {
		if (++settled == 3)
			s.Finish(d.connection());
	};
	Run(s);
	CHECK_EQ(settled, 3);
	CHECK_EQ(emu.Count("q", "deferred"), 1);
	CHECK_EQ(emu.Count("q", "abandoned"), 1);
	CHECK_EQ(emu.Count("q", "active"), 1);
	std::string dlq = emu.Get("/entities/q%2F%24DeadLetterQueue/messages");
	CHECK(dlq.find("\"dead_letter_reason\":\"ValidationFail\"") != std::string::npos);
	CHECK(dlq.find("\"dead_letter_description\":\"field x is absent\"") != std::string::npos);
}

TEST("settlement: settling after the lock expired is answered rejected with com.microsoft:message-lock-lost") {
	Sbemu emu({"--queue", "q"});
	SendText(emu, "q", "late");
	Script s;
	std::string answer;
	s.start = [&](proton::container &c) { SecondMode(c.open_receiver(emu.url() + "/q", PeekLock(1), Plain())); };
	s.message = [&](proton::delivery &d, proton::message &) {
		emu.Post("/faults/expire-locks");
		AcceptUnsettled(d);
	};
	s.delivery_settle = [&](proton::delivery &d) {
		pn_delivery_t *pd = harness::DeliveryAccess::Get(d);
		if (pn_delivery_remote_state(pd) == PN_REJECTED) {
			const char *name = pn_condition_get_name(pn_disposition_condition(pn_delivery_remote(pd)));
			answer = name ? name : "";
		}
		s.Finish(d.connection());
	};
	Run(s);
	CHECK_EQ(answer, std::string("com.microsoft:message-lock-lost"));
	CHECK_EQ(emu.Count("q", "active"), 1);
}

TEST("receive-and-delete: a settled-mode receiver gets pre-settled deliveries that leave the queue") {
	Sbemu emu({"--queue", "q"});
	SendText(emu, "q", "once");
	Script s;
	bool presettled = false;
	s.start = [&](proton::container &c) {
		c.open_receiver(emu.url() + "/q", proton::receiver_options().delivery_mode(proton::delivery_mode::AT_MOST_ONCE), Plain());
	};
	s.message = [&](proton::delivery &d, proton::message &) {
		presettled = pn_delivery_settled(harness::DeliveryAccess::Get(d));
		s.Finish(d.connection());
	};
	Run(s);
	CHECK(presettled);
	CHECK_EQ(emu.Count("q", "messages"), 0);
}

TEST("flow: a drain request is answered with the unused credit consumed") {
	Sbemu emu({"--queue", "q"});
	SendText(emu, "q", "only one");
	Script s;
	int got = 0;
	bool drained = false;
	s.start = [&](proton::container &c) {
		SecondMode(c.open_receiver(emu.url() + "/q", proton::receiver_options().auto_accept(false).credit_window(0), Plain()));
	};
	s.receiver_open = [&](proton::receiver &r) {
		r.add_credit(5);
		r.drain();
	};
	s.message = [&](proton::delivery &d, proton::message &) {
		++got;
		AcceptUnsettled(d);
	};
	s.drain_finish = [&](proton::receiver &r) {
		drained = r.credit() == 0;
		s.Finish(r.connection());
	};
	Run(s);
	CHECK_EQ(got, 1);
	CHECK(drained);
}

TEST("limits: a message over --max-message-size is rejected with amqp:link:message-size-exceeded") {
	Sbemu emu({"--queue", "q", "--max-message-size", "1024"});
	Script s;
	std::string cond;
	int n = 0;
	s.start = [&](proton::container &c) { c.open_sender(emu.url() + "/q", Plain()); };
	s.sendable = [&](proton::sender &snd) {
		if (n == 0) {
			snd.send(proton::message(std::string(2000, 'x')));
			snd.send(proton::message(std::string(100, 'y')));
			n = 2;
		}
	};
	s.tracker_reject = [&](proton::tracker &t) {
		const char *name = pn_condition_get_name(pn_disposition_condition(pn_delivery_remote(harness::DeliveryAccess::Get(t))));
		cond = name ? name : "";
	};
	s.tracker_accept = [&](proton::tracker &t) { s.Finish(t.connection()); };
	Run(s);
	CHECK_EQ(cond, std::string("amqp:link:message-size-exceeded"));
	CHECK_EQ(emu.Count("q", "active"), 1);
}

TEST("sessions: a session receiver closed while it waits for a session is answered, and takes no session") {
	// Regression: the detach of a receiver still waiting for a session was never answered, and the
	// link could later be given a session.
	Sbemu emu({}, kSessionQueue);
	Script s;
	bool answered = false, delivered = false;
	std::string got_session;
	proton::connection conn;
	s.start = [&](proton::container &c) { c.connect(emu.url(), Plain()); };
	s.connection_open = [&](proton::connection &c) {
		conn = c;
		proton::receiver r = c.open_receiver("sq", SessionReceiver(proton::value()));
		r.close(); // the attach and the detach go out together: the broker sees a waiting receiver detach
	};
	s.receiver_close = [&](proton::receiver &) {
		if (answered)
			return;
		answered = true;
		// A session that becomes available now goes to a new receiver, not to the closed one.
		SendText(emu, "sq", "for the next receiver", "?session_id=s1");
		conn.open_receiver("sq", SessionReceiver(proton::value()));
	};
	s.message = [&](proton::delivery &d, proton::message &m) {
		delivered = true;
		got_session = m.group_id();
		d.accept();
		s.Finish(conn);
	};
	Run(s);
	CHECK(answered);
	CHECK(delivered);
	CHECK_EQ(got_session, std::string("s1"));
	CHECK(s.errors.empty());
}

TEST("sessions: expiring locks ends the session lock once; its message is not redelivered to the receiver") {
	// Regression: expire-locks released the messages while the receiver still held the session, so
	// they came back to it, and the session expiry released them again (delivery count + 2).
	Sbemu emu({}, kSessionQueue);
	SendText(emu, "sq", "held", "?session_id=s1");
	Script s;
	int deliveries = 0;
	std::string lost;
	s.start = [&](proton::container &c) {
		SecondMode(c.open_receiver(emu.url() + "/sq", SessionReceiver(proton::value("s1")), Plain()));
	};
	s.message = [&](proton::delivery &, proton::message &) {
		if (++deliveries == 1)
			emu.Post("/faults/expire-locks");
	};
	s.error = [&](const std::string &where, const std::string &name, const std::string &) {
		if (where == "receiver") {
			lost = name;
			s.Finish();
		}
	};
	Run(s);
	CHECK_EQ(lost, std::string("com.microsoft:session-lock-lost"));
	CHECK_EQ(deliveries, 1);
	CHECK(harness::WaitUntil([&] { return emu.Count("sq", "consumers") == 0; }));
	std::string msgs = emu.Get("/entities/sq/messages");
	CHECK(msgs.find("\"delivery_count\":1,") != std::string::npos);
	CHECK(msgs.find("\"state\":\"active\"") != std::string::npos);
	CHECK_EQ(emu.Count("sq", "lock_expired"), 1);
}

TEST("cbs: a request of deeply nested described values is refused without harm") {
	// Regression: 300000 nested described constructors in one unauthenticated $cbs request
	// overflowed the stack of the message parser.
	Sbemu emu({"--queue", "q"});
	Script s;
	bool raw_sent = false, raw_settled = false;
	int status = 0;
	proton::connection conn;
	s.start = [&](proton::container &c) { c.connect(emu.url(), Anonymous()); };
	s.connection_open = [&](proton::connection &c) {
		conn = c;
		c.open_sender("$cbs");
	};
	s.sendable = [&](proton::sender &snd) {
		if (raw_sent)
			return;
		raw_sent = true;
		SendRaw(snd, std::string("\x00\x53\x77", 3) + std::string(300000, '\0'));
	};
	auto after = [&](proton::tracker &t) {
		if (raw_settled)
			return;
		raw_settled = true;
		// The connection still works: a proper put-token is answered.
		std::string tok = harness::SasToken(Audience(emu, "q"), kKeyName, kKey, harness::NowUnix() + 60);
		s.PutToken(conn, Audience(emu, "q"), tok, "servicebus.windows.net:sastoken", [&](int st) {
			status = st;
			s.Finish(conn);
		});
		(void)t;
	};
	s.tracker_accept = after;
	s.tracker_reject = after;
	Run(s);
	CHECK(raw_settled);
	CHECK_EQ(status, 202);
}

TEST("settlement: a received (non-terminal) state leaves the lock alone; the later outcome applies") {
	// Regression: a `received` disposition was taken for an abandon.
	Sbemu emu({"--queue", "q"});
	SendText(emu, "q", "in progress");
	Script s;
	bool settled = false;
	long abandoned_meanwhile = -1, locked_meanwhile = -1;
	proton::connection conn;
	s.start = [&](proton::container &c) {
		SecondMode(c.open_receiver(emu.url() + "/q", PeekLock(1), Plain()));
	};
	s.message = [&](proton::delivery &d, proton::message &) {
		conn = d.connection();
		pn_delivery_update(harness::DeliveryAccess::Get(d), PN_RECEIVED);
		// A $cbs round trip on the same connection: when its answer comes, the broker has seen
		// the received state (frames are handled in order).
		std::string tok = harness::SasToken(Audience(emu, "q"), kKeyName, kKey, harness::NowUnix() + 60);
		s.PutToken(conn, Audience(emu, "q"), tok, "servicebus.windows.net:sastoken", [&, d](int) mutable {
			abandoned_meanwhile = emu.Count("q", "abandoned");
			locked_meanwhile = emu.Count("q", "locked");
			AcceptUnsettled(d);
		});
	};
	s.delivery_settle = [&](proton::delivery &d) {
		settled = pn_delivery_remote_state(harness::DeliveryAccess::Get(d)) == PN_ACCEPTED;
		s.Finish(d.connection());
	};
	Run(s);
	CHECK_EQ(abandoned_meanwhile, 0);
	CHECK_EQ(locked_meanwhile, 1);
	CHECK(settled);
	CHECK_EQ(emu.Count("q", "completed"), 1);
	CHECK_EQ(emu.Count("q", "abandoned"), 0);
}

TEST("batches: a message whose data holds an encoded message is one message unless it has a batch's shape") {
	Sbemu emu({"--queue", "q"});
	// 1. The envelope sets a header field (ttl): an SDK's batch envelope never does.
	proton::message inner;
	inner.id("inner-1");
	inner.body(std::string("inner body"));
	std::vector<char> enc;
	inner.encode(enc);
	proton::message with_ttl(proton::binary(enc.begin(), enc.end()));
	with_ttl.inferred(true);
	with_ttl.id("outer-1");
	with_ttl.ttl(proton::duration(600000));
	// 2. The data holds a message without a properties section.
	const char bare_body[] = "\x00\x53\x77\xa1\x01x";
	proton::message no_props(proton::binary(bare_body, bare_body + 6));
	no_props.inferred(true);
	no_props.id("outer-2");
	Script s;
	int accepted = 0;
	bool sent = false;
	s.start = [&](proton::container &c) { c.open_sender(emu.url() + "/q", Plain()); };
	s.sendable = [&](proton::sender &snd) {
		if (sent)
			return;
		sent = true;
		snd.send(with_ttl);
		snd.send(no_props);
	};
	s.tracker_accept = [&](proton::tracker &t) {
		if (++accepted == 2)
			s.Finish(t.connection());
	};
	Run(s);
	CHECK_EQ(accepted, 2);
	std::string msgs = emu.Get("/entities/q/messages");
	CHECK(msgs.find("\"message_id\":\"outer-1\"") != std::string::npos);
	CHECK(msgs.find("\"message_id\":\"outer-2\"") != std::string::npos);
	CHECK(msgs.find("\"message_id\":\"inner-1\"") == std::string::npos);
	CHECK_EQ(emu.Count("q", "messages"), 2);
}

TEST("counts: max_locked_by_link is the most messages one receive link held locked at once") {
	Sbemu emu({"--queue", "q"});
	for (int i = 0; i < 6; ++i)
		SendText(emu, "q", "m" + std::to_string(i));
	// Link a takes 3, link b 2 (five locked in all); then a settles one and takes the sixth, so it
	// never holds more than three: the mark is per link, not the entity's locked count or the
	// deliveries a link got (four).
	Script s;
	proton::receiver a, b;
	std::vector<proton::delivery> held_a;
	int got_b = 0, settled = 0;
	bool topped_up = false;
	s.start = [&](proton::container &c) {
		proton::connection conn = c.connect(emu.url(), Plain());
		a = conn.open_receiver("q", PeekLock(0));
		b = conn.open_receiver("q", PeekLock(0));
		SecondMode(a);
		SecondMode(b);
	};
	s.receiver_open = [&](proton::receiver &r) { r.add_credit(r == a ? 3 : 2); };
	s.message = [&](proton::delivery &d, proton::message &) {
		if (d.receiver() == a)
			held_a.push_back(d);
		else
			++got_b;
		if (held_a.size() == 3 && got_b == 2 && !topped_up) {
			topped_up = true;
			AcceptUnsettled(held_a.front());
		} else if (held_a.size() == 4) {
			s.Finish(d.connection());
		}
	};
	s.delivery_settle = [&](proton::delivery &) {
		if (++settled == 1)
			a.add_credit(1);
	};
	Run(s);
	CHECK(s.done);
	CHECK_EQ(held_a.size(), 4u);
	CHECK_EQ(got_b, 2);
	CHECK_EQ(emu.Count("q", "completed"), 1);
	CHECK_EQ(emu.Count("q", "max_locked_by_link"), 3);
	// Closing the connection released the locks; the mark stays until /reset.
	CHECK(harness::WaitUntil([&] { return emu.Count("q", "locked") == 0; }));
	CHECK_EQ(emu.Count("q", "max_locked_by_link"), 3);
	emu.Post("/reset");
	CHECK_EQ(emu.Count("q", "max_locked_by_link"), 0);
}

TEST("faults: server-busy answers the next attaches with com.microsoft:server-busy") {
	Sbemu emu({"--queue", "q"});
	emu.Post("/faults/server-busy?count=1");
	Script s;
	std::vector<std::string> conds;
	bool second_open = false;
	proton::connection conn;
	s.start = [&](proton::container &c) { c.connect(emu.url(), Plain()); };
	s.connection_open = [&](proton::connection &c) {
		conn = c;
		c.open_receiver("q", PeekLock());
	};
	s.error = [&](const std::string &where, const std::string &name, const std::string &) {
		if (where != "receiver")
			return;
		conds.push_back(name);
		conn.open_receiver("q", PeekLock());
	};
	s.receiver_open = [&](proton::receiver &) {
		second_open = true;
		s.Finish(conn);
	};
	Run(s);
	REQUIRE(conds.size() == 1);
	CHECK_EQ(conds[0], std::string("com.microsoft:server-busy"));
	CHECK(second_open);
}

TEST("faults: dropping connections keeps unsettled messages, redelivered with delivery-count + 1") {
	Sbemu emu({"--queue", "q"});
	SendText(emu, "q", "survivor");
	Script s;
	bool dropped = false;
	s.start = [&](proton::container &c) { SecondMode(c.open_receiver(emu.url() + "/q", PeekLock(1), Plain())); };
	s.message = [&](proton::delivery &, proton::message &) { emu.Post("/faults/drop-connections"); };
	s.error = [&](const std::string &where, const std::string &, const std::string &) {
		if (where == "transport") {
			dropped = true;
			s.Finish();
		}
	};
	Run(s);
	CHECK(dropped);
	CHECK(harness::WaitUntil([&] { return emu.Count("q", "active") == 1; }));
	Script again;
	uint32_t count = 0;
	again.start = [&](proton::container &c) { SecondMode(c.open_receiver(emu.url() + "/q", PeekLock(1), Plain())); };
	again.message = [&](proton::delivery &d, proton::message &m) {
		count = m.delivery_count();
		AcceptUnsettled(d);
	};
	again.delivery_settle = [&](proton::delivery &d) { again.Finish(d.connection()); };
	Run(again);
	CHECK_EQ(count, 1u);
	CHECK_EQ(emu.Count("q", "completed"), 1);
}

TEST("faults: refused connections fail until the window ends, then connect") {
	Sbemu emu({"--queue", "q"});
	emu.Post("/faults/refuse-connections?ms=1500");
	Script s;
	std::string err;
	s.start = [&](proton::container &c) { c.connect(emu.url(), Plain()); };
	s.error = [&](const std::string &where, const std::string &, const std::string &) {
		if (err.empty())
			err = where;
		s.Finish();
	};
	Run(s);
	CHECK_EQ(err, std::string("transport"));
	CHECK(harness::WaitUntil([&] { return emu.Get("/stats").find("\"refusing_connections\":false") != std::string::npos; }));
	Script ok;
	bool opened = false;
	ok.start = [&](proton::container &c) { c.connect(emu.url(), Plain()); };
	ok.connection_open = [&](proton::connection &c) {
		opened = true;
		ok.Finish(c);
	};
	Run(ok);
	CHECK(opened);
}

TEST("faults: refusing for 0 ms, /faults/clear and /reset all reopen the listeners") {
	// Regression: with ms=0 the listener could be reopened before its close event and then stay
	// closed; /faults/clear and /reset did not end a refusal.
	Sbemu emu({"--queue", "q"});
	auto listening = [&] { return emu.Get("/stats").find("\"listening\":true") != std::string::npos; };
	auto connects = [&] {
		Script ok;
		bool opened = false;
		ok.start = [&](proton::container &c) { c.connect(emu.url(), Plain()); };
		ok.connection_open = [&](proton::connection &c) {
			opened = true;
			ok.Finish(c);
		};
		ok.error = [&](const std::string &, const std::string &, const std::string &) { ok.Finish(); };
		Run(ok);
		return opened;
	};
	emu.Post("/faults/refuse-connections?ms=0");
	CHECK(harness::WaitUntil(listening));
	CHECK(emu.Get("/stats").find("\"refusing_connections\":false") != std::string::npos);
	CHECK(connects());
	for (const char *end : {"/faults/clear", "/reset"}) {
		emu.Post("/faults/refuse-connections?seconds=600");
		CHECK(harness::WaitUntil([&] { return !listening(); }));
		emu.Post(end);
		CHECK(harness::WaitUntil(listening));
		CHECK(connects());
	}
}

TEST("control: an idle client holds up no other request; chunked bodies are refused with 411") {
	Sbemu emu({"--queue", "q"});
	int idle = harness::ConnectTcp(emu.control_hostport());
	REQUIRE(idle >= 0);
	int partial = harness::ConnectTcp(emu.control_hostport());
	REQUIRE(partial >= 0);
	std::string half = "GET /stats HTTP/1.1\r\nHost: x\r\n";
	REQUIRE(write(partial, half.data(), half.size()) == static_cast<ssize_t>(half.size()));
	// Served while both are still connected and waiting.
	CHECK(emu.Get("/stats").find("\"connections\"") != std::string::npos);
	char b;
	CHECK(recv(idle, &b, 1, MSG_DONTWAIT) < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
	int fd = harness::ConnectTcp(emu.control_hostport());
	REQUIRE(fd >= 0);
	std::string chunked = "POST /entities/q/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
	                      "5\r\nhello\r\n0\r\n\r\n";
	REQUIRE(write(fd, chunked.data(), chunked.size()) == static_cast<ssize_t>(chunked.size()));
	std::string resp = harness::ReadAll(fd);
	close(fd);
	CHECK(resp.compare(0, 12, "HTTP/1.1 411") == 0);
	CHECK_EQ(emu.Count("q", "messages"), 0);
	// SIGTERM with both clients still connected: sbemu stops (the harness fails the test if not).
	emu.Stop();
	close(idle);
	close(partial);
}

TEST("faults: delayed dispositions are answered late, and a drop during the delay loses the settlement") {
	Sbemu emu({"--queue", "q"});
	SendText(emu, "q", "slow broker");
	emu.Post("/faults/delay-dispositions?ms=300");
	Script s;
	bool settled = false;
	s.start = [&](proton::container &c) { SecondMode(c.open_receiver(emu.url() + "/q", PeekLock(1), Plain())); };
	s.message = [&](proton::delivery &d, proton::message &) { AcceptUnsettled(d); };
	s.delivery_settle = [&](proton::delivery &d) {
		settled = true;
		s.Finish(d.connection());
	};
	Run(s);
	CHECK(settled);
	CHECK_EQ(emu.Count("q", "completed"), 1);

	SendText(emu, "q", "lost settlement");
	emu.Post("/faults/delay-dispositions?ms=10000");
	Script d2;
	bool dropped = false;
	d2.start = [&](proton::container &c) { SecondMode(c.open_receiver(emu.url() + "/q", PeekLock(1), Plain())); };
	d2.message = [&](proton::delivery &d, proton::message &) {
		AcceptUnsettled(d);
		emu.Post("/faults/drop-connections");
	};
	d2.error = [&](const std::string &where, const std::string &, const std::string &) {
		if (where == "transport") {
			dropped = true;
			d2.Finish();
		}
	};
	d2.delivery_settle = [&](proton::delivery &) { tap::Fail(__FILE__, __LINE__, "settled despite the delay"); };
	Run(d2);
	CHECK(dropped);
	emu.Post("/faults/clear");
	CHECK(harness::WaitUntil([&] { return emu.Count("q", "active") == 1; }));
	CHECK_EQ(emu.Count("q", "completed"), 1); // only the first message
}

TEST("tls: a TLS listener with a test CA serves a client that verifies the host name") {
	char dir[] = "/tmp/sbemu-tls-XXXXXX";
	REQUIRE(mkdtemp(dir));
	std::string d = dir;
	REQUIRE(std::system((std::string(REPO_ROOT "/test/lib/make-test-ca.sh ") + d + " >/dev/null 2>&1").c_str()) == 0);
	Sbemu emu({"--queue", "q", "--tls-listen", "127.0.0.1:0", "--tls-cert", d + "/server.pem", "--tls-key",
	           d + "/server.key"});
	REQUIRE(!emu.tls_hostport().empty());
	std::string port = emu.tls_hostport().substr(emu.tls_hostport().rfind(':') + 1);
	auto tls = [&](const std::string &ca) {
		proton::connection_options o = Plain();
		o.ssl_client_options(proton::ssl_client_options(ca, proton::ssl::VERIFY_PEER_NAME));
		o.virtual_host("localhost");
		return o;
	};
	Script s;
	bool accepted = false, sent = false;
	s.start = [&](proton::container &c) { c.open_sender("amqps://127.0.0.1:" + port + "/q", tls(d + "/ca.pem")); };
	s.sendable = [&](proton::sender &snd) {
		if (!sent) {
			sent = true;
			snd.send(proton::message("over TLS"));
		}
	};
	s.tracker_accept = [&](proton::tracker &t) {
		accepted = true;
		s.Finish(t.connection());
	};
	Run(s);
	CHECK(accepted);
	CHECK(emu.Get("/connections").find("\"tls\":true") != std::string::npos || emu.Count("q", "active") == 1);
	CHECK_EQ(emu.Count("q", "active"), 1);

	Script untrusted;
	std::string err;
	untrusted.start = [&](proton::container &c) { c.connect("amqps://127.0.0.1:" + port, tls(d + "/other-ca.pem")); };
	untrusted.error = [&](const std::string &where, const std::string &, const std::string &) {
		if (err.empty())
			err = where;
		untrusted.Finish();
	};
	Run(untrusted);
	CHECK_EQ(err, std::string("transport"));
	std::system(("rm -rf " + d).c_str());
}

TAP_MAIN
