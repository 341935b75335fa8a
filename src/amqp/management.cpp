// src/amqp/management.cpp
//   Requests on Service Bus's <entity>/$management node, on the AMQP thread: the link pair, the
//   requests (each with an id the answer's correlation-id names, and the receiver's link name),
//   the answers' status, and the failures. Invariants: every request's callback runs exactly once
//   (with the answer, or with code -1 when no answer can come: the pair or the connection lost, or
//   60 s passed); a pair that opened on this connection is reopened after a detach with a growing
//   pause (1 s doubling to 30 s), one that never opened is given up until the next connection.
#include "consumer_impl.hpp"

#include <proton/message_id.hpp>
#include <proton/scalar.hpp>

#include <algorithm>

namespace sbpg::amqp {

void
Management::Open() {
	links_.Open(live_.conn, cfg_.entity + "/$management", "mgmt-", 50);
}

void
Management::ReopenIfDue(int64_t now) {
	if (reopen_at_ && now >= reopen_at_ && live_.receiving)
		Reopen();
}

void
Management::Reopen() {
	reopen_at_ = 0;
	links_.Close();
	Open();
}

bool
Management::OnOpened(const proton::sender &s) {
	if (!links_.Owns(s))
		return false;
	sender_open_ = true;
	Opened();
	return true;
}

bool
Management::OnOpened(const proton::receiver &r) {
	if (!links_.Owns(r))
		return false;
	receiver_open_ = true;
	Opened();
	return true;
}

void
Management::Opened() {
	if (!sender_open_ || !receiver_open_)
		return;
	ever_open_ = true;
	reopens_ = 0;
	std::lock_guard<std::mutex> g(handoff_.mu);
	handoff_.status.management_ready = true;
	handoff_.status.management_failed = false;
}

void
Management::OnDetached(const std::string &why) {
	sender_open_ = receiver_open_ = false;
	FailCalls(why);
	if (ever_open_) {
		// It worked on this connection: a detach (Service Bus detaches links idle for 10
		// minutes) is answered by opening the pair again, after a growing pause.
		{
			std::lock_guard<std::mutex> g(handoff_.mu);
			handoff_.status.management_ready = false;
		}
		int64_t delay = std::min<int64_t>(30000, 1000LL << std::min(reopens_, 5));
		++reopens_;
		reopen_at_ = Now() + delay;
		handoff_.Event(ConsumerEvent::Kind::Error,
		               "the $management link was lost (" + why + "); reopening it in " + std::to_string(delay) + " ms");
		return;
	}
	bool first;
	{
		std::lock_guard<std::mutex> g(handoff_.mu);
		first = !handoff_.status.management_failed;
		handoff_.status.management_failed = true;
		handoff_.status.management_ready = false;
	}
	if (first)
		handoff_.Event(ConsumerEvent::Kind::Error, "the broker's $management link is unavailable (" + why +
		                                               "): message locks are not renewed and nothing is deferred");
}

void
Management::Request(const std::string &operation, proton::value body, Done done, const std::string &link_name) {
	proton::message m;
	std::string id = "sbpg-" + std::to_string(++next_);
	m.id(proton::message_id(id));
	m.properties().put("operation", operation);
	if (!link_name.empty())
		m.properties().put("associated-link-name", link_name);
	else if (live_.receiver)
		m.properties().put("associated-link-name", live_.receiver.name());
	m.body(body);
	pending_[id] = Call{std::move(done), Now()};
	links_.Send(std::move(m));
}

namespace {

// The status of a $management answer; Service Bus spells the keys in two ways.
void
ReadStatus(proton::message &m, int64_t *code, std::string *desc) {
	try {
		auto props = m.properties();
		if (props.exists("statusCode"))
			*code = proton::coerce<int64_t>(props.get("statusCode"));
		else if (props.exists("status-code"))
			*code = proton::coerce<int64_t>(props.get("status-code"));
		if (props.exists("statusDescription"))
			*desc = proton::coerce<std::string>(props.get("statusDescription"));
		else if (props.exists("status-description"))
			*desc = proton::coerce<std::string>(props.get("status-description"));
		if (props.exists("errorCondition"))
			*desc = proton::coerce<std::string>(props.get("errorCondition")) + (desc->empty() ? "" : ": " + *desc);
	} catch (const std::exception &e) {
		*code = 0;
		*desc = std::string("unreadable $management answer: ") + e.what();
	}
}

} // namespace

void
Management::OnReply(proton::message &m) {
	std::string id;
	try {
		id = proton::coerce<std::string>(m.correlation_id());
	} catch (const std::exception &) {
		return;
	}
	auto it = pending_.find(id);
	if (it == pending_.end())
		return;
	Done done = std::move(it->second.done);
	pending_.erase(it);
	int64_t code = 0;
	std::string desc;
	ReadStatus(m, &code, &desc);
	done(code, desc, m.body());
}

// Answers every outstanding request with code -1 (connection lost, or no $management).
void
Management::FailCalls(const std::string &why) {
	std::map<std::string, Call> pending;
	pending.swap(pending_);
	links_.DropQueue();
	for (auto &p : pending)
		p.second.done(-1, why, proton::value());
}

void
Management::Expire(int64_t now) {
	std::vector<std::string> late;
	for (auto &p : pending_)
		if (now - p.second.sent_ms > 60000)
			late.push_back(p.first);
	for (auto &id : late) {
		Done done = std::move(pending_[id].done);
		pending_.erase(id);
		done(-1, "no answer within 60 s", proton::value());
	}
}

void
Management::Reset() {
	FailCalls("the connection was lost");
	links_.Reset();
	sender_open_ = receiver_open_ = false;
	ever_open_ = false;
	reopen_at_ = 0;
	reopens_ = 0;
}

bool
Management::Field(const proton::value &body, const char *key, proton::value *out) {
	try {
		std::map<proton::value, proton::value> m;
		proton::get(body, m);
		for (auto &kv : m) {
			if (proton::coerce<std::string>(kv.first) == key) {
				*out = kv.second;
				return true;
			}
		}
	} catch (const std::exception &) {
	}
	return false;
}

} // namespace sbpg::amqp
