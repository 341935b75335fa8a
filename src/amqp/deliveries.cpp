// src/amqp/deliveries.cpp
//   Deliveries on the peek-lock receiver, from receipt to settlement, on the AMQP thread: decoding
//   a transfer into a ReceivedMessage and handing it to the main thread; sending the dispositions
//   the main thread asks for (complete, dead-letter, defer, abandon; over $management with the
//   lock token for messages fetched by sequence number); the broker's answers; credit.
//   Invariants: the receiver settles second, so every outcome is confirmed by the broker before it
//   is reported as done (unless the broker answered settle-mode first, then locally); a settlement
//   for another connection generation, or for a delivery no longer held, is answered as failed;
//   one credit is granted per completed settlement, so at most `prefetch` messages are held.
#include "consumer_impl.hpp"

#include <proton/codec.h>
#include <proton/condition.h>
#include <proton/disposition.h>
#include <proton/uuid.hpp>

#include <cstring>

namespace sbpg::amqp {

namespace {

void
PutSymbolString(pn_data_t *d, const char *key, const std::string &value) {
	pn_data_put_symbol(d, pn_bytes(std::strlen(key), key));
	pn_data_put_string(d, pn_bytes(value.size(), value.data()));
}

// Service Bus's dead-letter: rejected with the condition com.microsoft:dead-letter, whose info
// map carries the reason and the description.
void
SetDeadLetter(pn_disposition_t *local, const Settlement &s) {
	pn_condition_t *cond = pn_disposition_condition(local);
	std::string reason = Truncate(s.reason, 4096), desc = Truncate(s.description, 4096);
	pn_condition_set_name(cond, "com.microsoft:dead-letter");
	pn_condition_set_description(cond, desc.c_str());
	pn_data_t *info = pn_condition_info(cond);
	pn_data_clear(info);
	pn_data_put_map(info);
	pn_data_enter(info);
	PutSymbolString(info, "DeadLetterReason", reason);
	PutSymbolString(info, "DeadLetterErrorDescription", desc);
	pn_data_exit(info);
}

// What update-disposition calls each outcome.
const char *
DispositionStatus(Outcome o) {
	switch (o) {
	case Outcome::DeadLetter:
		return "suspended";
	case Outcome::Abandon:
		return "abandoned";
	case Outcome::Defer:
		return "defered"; // sic: the service's spelling
	case Outcome::Complete:
	default:
		return "completed";
	}
}

} // namespace

void
Deliveries::Start(proton::receiver &r, uint32_t credit) {
	broker_settles_first_ = pn_link_remote_rcv_settle_mode(LinkAccess::Get(r)) == PN_RCV_FIRST;
	r.add_credit(credit);
}

void
Deliveries::Receive(proton::delivery &d, proton::message &m, uint64_t link_gen) {
	ReceivedMessage rm = live_.NewMessage();
	rm.in_session = link_gen != 0;
	rm.link_gen = link_gen;
	try {
		std::vector<char> buf;
		m.encode(buf);
		DecodeMessage(std::string_view(buf.data(), buf.size()), cfg_.max_json_depth, &rm);
	} catch (const std::exception &e) {
		rm.decode_error = ToValidUtf8(std::string("the message could not be decoded: ") + e.what());
	}
	handoff_.Classify(&rm);
	unsettled_[rm.delivery_id] = d;
	ids_[DeliveryAccess::Get(d)] = rm.delivery_id;
	// The lock token is the delivery tag (.NET byte order); $management wants RFC order. A session's
	// messages are covered by the session lock (SessionLinks renews it): no renewal of their own.
	proton::binary tag = d.tag();
	uint8_t token[16];
	if (tag.size() == 16)
		DotNetGuidSwap(reinterpret_cast<const uint8_t *>(tag.data()), token);
	locks_.Hold(rm, tag.size() == 16 && !link_gen ? token : nullptr, false);
	{
		std::lock_guard<std::mutex> g(handoff_.mu);
		handoff_.inbox.push_back(std::move(rm));
		handoff_.status.in_flight = static_cast<uint32_t>(unsettled_.size());
	}
	handoff_.Wake();
}

void
Deliveries::Drain() {
	std::vector<Settlement> batch;
	{
		std::lock_guard<std::mutex> g(handoff_.mu);
		batch.swap(handoff_.to_settle);
	}
	std::vector<SettleResult> done;
	for (auto &s : batch) {
		Lock *lk = locks_.Find(s.delivery_id);
		if (s.connection_gen == live_.gen && lk && lk->fetched) {
			SettleFetched(s, *lk);
			continue;
		}
		auto it = unsettled_.find(s.delivery_id);
		if (s.connection_gen != live_.gen || it == unsettled_.end()) {
			done.push_back({s.delivery_id, false, "the delivering connection is gone"});
			continue;
		}
		Dispose(DeliveryAccess::Get(it->second), s);
		if (broker_settles_first_) {
			Finish(s.delivery_id);
			done.push_back({s.delivery_id, true, ""});
		}
	}
	if (!done.empty()) {
		{
			std::lock_guard<std::mutex> g(handoff_.mu);
			handoff_.results.insert(handoff_.results.end(), done.begin(), done.end());
			handoff_.status.in_flight = static_cast<uint32_t>(unsettled_.size());
		}
		handoff_.Wake();
	}
}

// Sets the delivery's local state to the outcome and sends it.
void
Deliveries::Dispose(pn_delivery_t *pd, const Settlement &s) {
	pn_disposition_t *local = pn_delivery_local(pd);
	uint64_t state = PN_ACCEPTED;
	switch (s.outcome) {
	case Outcome::Complete:
		state = PN_ACCEPTED;
		break;
	case Outcome::DeadLetter:
		state = PN_REJECTED;
		SetDeadLetter(local, s);
		break;
	case Outcome::Defer:
		// Service Bus defers on `modified` with undeliverable-here.
		state = PN_MODIFIED;
		pn_disposition_set_failed(local, false);
		pn_disposition_set_undeliverable(local, true);
		break;
	case Outcome::Abandon:
		if (cfg_.release_to_abandon) {
			state = PN_RELEASED;
		} else {
			state = PN_MODIFIED;
			pn_disposition_set_failed(local, true);
			pn_disposition_set_undeliverable(local, false);
		}
		break;
	}
	pn_delivery_update(pd, state);
}

// Settles a message received by sequence number: over $management, with its lock token.
void
Deliveries::SettleFetched(const Settlement &s, Lock &l) {
	std::map<std::string, proton::value> body;
	proton::uuid u;
	std::memcpy(&u[0], l.token, 16);
	body["lock-tokens"] = std::vector<proton::uuid>{u};
	body["disposition-status"] = std::string(DispositionStatus(s.outcome));
	if (s.outcome == Outcome::DeadLetter) {
		body["deadletter-reason"] = Truncate(s.reason, 4096);
		body["deadletter-description"] = Truncate(s.description, 4096);
	}
	uint64_t id = s.delivery_id;
	l.renewing = true; // no renewal races the settlement
	mgmt_.Request(
	    "com.microsoft:update-disposition", body,
	    [this, id](int64_t code, const std::string &desc, const proton::value &) {
		    locks_.Release(id);
		    {
			    std::lock_guard<std::mutex> g(handoff_.mu);
			    handoff_.results.push_back({id, code == 200, code == 200 ? "" : std::to_string(code) + " " + desc});
		    }
		    handoff_.Wake();
	    });
}

// Settles a delivery locally and returns its credit.
void
Deliveries::Finish(uint64_t id) {
	auto it = unsettled_.find(id);
	if (it == unsettled_.end())
		return;
	proton::delivery d = it->second;
	ids_.erase(DeliveryAccess::Get(d));
	unsettled_.erase(it);
	locks_.Release(id);
	proton::receiver r = d.receiver();
	d.settle();
	if (r && r.active())
		r.add_credit(1);
}

void
Deliveries::DropLink(const proton::receiver &r) {
	for (auto it = unsettled_.begin(); it != unsettled_.end();) {
		if (it->second.receiver() == r) {
			ids_.erase(DeliveryAccess::Get(it->second));
			locks_.Release(it->first);
			it = unsettled_.erase(it);
		} else {
			++it;
		}
	}
	std::lock_guard<std::mutex> g(handoff_.mu);
	handoff_.status.in_flight = static_cast<uint32_t>(unsettled_.size());
}

size_t
Deliveries::UnsettledOn(const proton::receiver &r) const {
	size_t n = 0;
	for (auto &kv : unsettled_)
		n += kv.second.receiver() == r;
	return n;
}

void
Deliveries::OnSettled(proton::delivery &d) {
	auto it = ids_.find(DeliveryAccess::Get(d));
	if (it == ids_.end()) {
		d.settle();
		return;
	}
	uint64_t id = it->second;
	pn_delivery_t *pd = DeliveryAccess::Get(d);
	bool ok = true;
	std::string err;
	if (pn_delivery_remote_state(pd) == PN_REJECTED) {
		pn_condition_t *c = pn_disposition_condition(pn_delivery_remote(pd));
		if (pn_condition_is_set(c)) {
			ok = false;
			const char *name = pn_condition_get_name(c), *desc = pn_condition_get_description(c);
			err = std::string(name ? name : "rejected") + (desc ? std::string(": ") + desc : "");
		}
	}
	Finish(id);
	{
		std::lock_guard<std::mutex> g(handoff_.mu);
		handoff_.results.push_back({id, ok, err});
		handoff_.status.in_flight = static_cast<uint32_t>(unsettled_.size());
	}
	handoff_.Wake();
}

void
Deliveries::Clear() {
	unsettled_.clear();
	ids_.clear();
}

} // namespace sbpg::amqp
