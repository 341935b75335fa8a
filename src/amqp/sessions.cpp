// src/amqp/sessions.cpp
//   Session receivers, on the AMQP thread (SessionLinks in consumer_impl.hpp): each asks the broker
//   for the next available session and then holds the one it locked, until the session is idle
//   (released for the next), its lock is lost, or the connection goes. Invariants: a receiver's
//   link generation is in Handoff::live_links exactly while it holds its session, so the main
//   thread never applies or settles a message of a session this consumer no longer holds; session
//   messages have no message-lock renewal of their own (the session lock covers them); at most
//   max_sessions receivers exist at once, waiting or holding.
#include "consumer_impl.hpp"

#include <proton/codec.h>
#include <proton/condition.h>
#include <proton/receiver_options.hpp>
#include <proton/timestamp.hpp>

#include <algorithm>
#include <cstring>

namespace sbpg::amqp {

namespace {

constexpr const char *kSessionFilter = "com.microsoft:session-filter";

void
PutSymbol(pn_data_t *d, const char *s) {
	pn_data_put_symbol(d, pn_bytes(std::strlen(s), s));
}

// The value under a symbol key of a described-or-plain map in d (positioned before it), as text or
// as a long; false when absent.
bool
MapEntry(pn_data_t *d, const char *key, std::string *text, int64_t *number) {
	pn_data_rewind(d);
	if (!pn_data_next(d))
		return false;
	if (pn_data_type(d) == PN_DESCRIBED) {
		pn_data_enter(d);
		pn_data_next(d); // descriptor
		pn_data_next(d);
	}
	if (pn_data_type(d) != PN_MAP)
		return false;
	size_t n = pn_data_get_map(d);
	pn_data_enter(d);
	for (size_t i = 0; i + 1 < n; i += 2) {
		if (!pn_data_next(d))
			return false;
		bool match = false;
		if (pn_data_type(d) == PN_SYMBOL || pn_data_type(d) == PN_STRING) {
			pn_bytes_t k = pn_data_type(d) == PN_SYMBOL ? pn_data_get_symbol(d) : pn_data_get_string(d);
			match = k.size == std::strlen(key) && std::memcmp(k.start, key, k.size) == 0;
		}
		if (!pn_data_next(d))
			return false;
		if (!match)
			continue;
		if (pn_data_type(d) == PN_DESCRIBED) {
			pn_data_enter(d);
			pn_data_next(d);
			pn_data_next(d);
		}
		switch (pn_data_type(d)) {
		case PN_STRING: {
			pn_bytes_t b = pn_data_get_string(d);
			if (text)
				text->assign(b.start, b.size);
			return text != nullptr;
		}
		case PN_SYMBOL: {
			pn_bytes_t b = pn_data_get_symbol(d);
			if (text)
				text->assign(b.start, b.size);
			return text != nullptr;
		}
		case PN_LONG:
			if (number)
				*number = pn_data_get_long(d);
			return number != nullptr;
		case PN_TIMESTAMP:
			if (number)
				*number = pn_data_get_timestamp(d);
			return number != nullptr;
		default:
			return false;
		}
	}
	return false;
}

// How long after a renewal the next one is due: half the lock's length, at least 0.5 s and at most
// 10 s (a local clock that runs behind the broker's makes the length look longer than it is).
int64_t
RenewalInterval(int64_t duration_ms) {
	return std::clamp<int64_t>(duration_ms / 2, 500, 10000);
}

// .NET ticks (100 ns since 0001-01-01) to Unix milliseconds.
int64_t
TicksToUnixMs(int64_t ticks) {
	return (ticks - 621355968000000000LL) / 10000;
}

std::string
ConditionName(const proton::error_condition &e) {
	return e ? e.name() : std::string();
}

} // namespace

SessionLinks::Link *
SessionLinks::Find(const proton::receiver &r) {
	for (auto &l : links_)
		if (l.receiver == r)
			return &l;
	return nullptr;
}

const SessionLinks::Link *
SessionLinks::Find(const proton::receiver &r) const {
	for (auto &l : links_)
		if (l.receiver == r)
			return &l;
	return nullptr;
}

uint64_t
SessionLinks::LinkGen(const proton::receiver &r) const {
	const Link *l = Find(r);
	return l && l->locked && !l->closing ? l->gen : 0;
}

size_t
SessionLinks::Held() const {
	size_t n = 0;
	for (auto &l : links_)
		n += l.locked && !l.closing;
	return n;
}

void
SessionLinks::Publish() {
	std::lock_guard<std::mutex> g(handoff_.mu);
	handoff_.status.sessions_held = static_cast<uint32_t>(Held());
}

void
SessionLinks::Fill(int64_t now) {
	if (!live_.conn || now < fill_at_)
		return;
	while (links_.size() < static_cast<size_t>(std::max(1, cfg_.max_sessions))) {
		Link l;
		l.gen = ++live_.next_link_gen;
		l.receiver = live_.conn.open_receiver(cfg_.entity,
		                                      proton::receiver_options().credit_window(0).auto_accept(false));
		// Set before the attach frame goes out (it is written after this callback returns): peek-lock
		// with the broker confirming settlements, the next available session, and how long the broker
		// may keep the attach waiting for one.
		pn_link_t *pl = LinkAccess::Get(l.receiver);
		pn_link_set_rcv_settle_mode(pl, PN_RCV_SECOND);
		pn_data_t *f = pn_terminus_filter(pn_link_source(pl));
		pn_data_clear(f);
		pn_data_put_map(f);
		pn_data_enter(f);
		PutSymbol(f, kSessionFilter);
		pn_data_put_null(f);
		pn_data_exit(f);
		pn_data_t *p = pn_link_properties(pl);
		pn_data_clear(p);
		pn_data_put_map(p);
		pn_data_enter(p);
		PutSymbol(p, "com.microsoft:timeout");
		pn_data_put_uint(p, static_cast<uint32_t>(std::clamp<int64_t>(cfg_.session_wait_ms, 1000, 86400000)));
		pn_data_exit(p);
		links_.push_back(std::move(l));
	}
}

bool
SessionLinks::OnOpened(proton::receiver &r) {
	Link *l = Find(r);
	if (!l)
		return false;
	pn_link_t *pl = LinkAccess::Get(r);
	std::string sid;
	// A refused attach (no session free within the time-out) comes with no source; the detach
	// that follows says why.
	if (!pn_link_remote_source(pl) ||
	    !MapEntry(pn_terminus_filter(pn_link_remote_source(pl)), kSessionFilter, &sid, nullptr))
		return false;
	int64_t now = Now(), ticks = 0;
	l->session_id = sid;
	l->locked = true;
	l->last_activity_ms = now;
	// The lock's length, as far as the two clocks agree; without it, renew soon.
	l->duration_ms = 5000;
	if (MapEntry(pn_link_remote_properties(pl), "com.microsoft:locked-until-utc", nullptr, &ticks) && ticks > 0)
		l->duration_ms = std::max<int64_t>(1000, TicksToUnixMs(ticks) - now);
	l->renew_at_ms = now + RenewalInterval(l->duration_ms);
	uint32_t credit = static_cast<uint32_t>(
	    std::max(1, static_cast<int>(cfg_.prefetch) / std::max(1, cfg_.max_sessions)));
	deliveries_.Start(r, credit);
	{
		std::lock_guard<std::mutex> g(handoff_.mu);
		handoff_.live_links.insert(l->gen);
		++handoff_.status.sessions_accepted;
	}
	Publish();
	handoff_.Event(ConsumerEvent::Kind::SessionAccepted, sid);
	return true;
}

void
SessionLinks::OnActivity(const proton::receiver &r, int64_t now) {
	if (Link *l = Find(r))
		l->last_activity_ms = now;
}

// The session is no longer ours: what it delivered cannot be settled; the broker delivers it again.
void
SessionLinks::Lose(Link &l, const std::string &why) {
	{
		std::lock_guard<std::mutex> g(handoff_.mu);
		handoff_.live_links.erase(l.gen);
		++handoff_.status.sessions_lost;
	}
	deliveries_.DropLink(l.receiver);
	bool was_locked = l.locked;
	l.locked = false;
	if (!l.closing && l.receiver.active()) {
		l.closing = true;
		l.receiver.close();
	}
	Publish();
	if (was_locked)
		handoff_.Event(ConsumerEvent::Kind::SessionLost, "session \"" + l.session_id + "\": " + why);
}

std::string
SessionLinks::OnClosed(proton::receiver &r) {
	Link *l = Find(r);
	if (!l)
		return "";
	std::string cond = ConditionName(r.error());
	std::string why;
	if (l->locked && !l->closing) {
		// The broker ended a session we held (its lock expired, or an error).
		Lose(*l, cond.empty() ? "detached by the broker" : cond + ": " + r.error().description());
	} else if (!l->locked && !l->closing && !cond.empty() && cond != "com.microsoft:timeout") {
		// Refused before any session was locked, for a reason other than none being free.
		why = "the session receiver was refused: " + cond +
		      (r.error().description().empty() ? "" : ": " + r.error().description());
	}
	{
		std::lock_guard<std::mutex> g(handoff_.mu);
		handoff_.live_links.erase(l->gen);
	}
	deliveries_.DropLink(r);
	links_.erase(links_.begin() + (l - links_.data()));
	Publish();
	// No session was free: the next receiver asks again at once (the broker's wait paces it). After
	// anything else, a short pause.
	fill_at_ = cond == "com.microsoft:timeout" || cond.empty() ? 0 : Now() + 1000;
	return why;
}

void
SessionLinks::Renew(Link &l) {
	l.renewing = true;
	std::map<std::string, proton::value> body;
	body["session-id"] = l.session_id;
	uint64_t gen = l.gen;
	mgmt_.Request(
	    "com.microsoft:renew-session-lock", body,
	    [this, gen](int64_t code, const std::string &desc, const proton::value &) {
		    Link *found = nullptr;
		    for (auto &x : links_)
			    if (x.gen == gen)
				    found = &x;
		    if (!found || !found->locked || found->closing)
			    return;
		    found->renewing = false;
		    if (code == 200) {
			    found->renew_at_ms = Now() + RenewalInterval(found->duration_ms);
			    std::lock_guard<std::mutex> g(handoff_.mu);
			    ++handoff_.status.lock_renewals;
		    } else if (code == 410 || desc.find("session-lock-lost") != std::string::npos) {
			    Lose(*found, "the broker refused to renew its lock: " + std::to_string(code) + " " + desc);
		    } else {
			    // A time-out or a lost link: again in a second (if the lock lapses meanwhile, the
			    // broker detaches the receiver).
			    found->renew_at_ms = Now() + 1000;
		    }
	    },
	    l.receiver.name());
}

void
SessionLinks::Work(int64_t now) {
	for (auto &l : links_) {
		if (!l.locked || l.closing)
			continue;
		// The lock is lost when the broker says so (a detach with session-lock-lost, or a refused
		// renewal), not by the local clock, which may not agree with the broker's.
		if (!l.renewing && mgmt_.Ready() && now >= l.renew_at_ms)
			Renew(l);
		if (now - l.last_activity_ms >= cfg_.session_idle_ms && deliveries_.UnsettledOn(l.receiver) == 0) {
			// Idle: release it for the next session (and another consumer).
			{
				std::lock_guard<std::mutex> g(handoff_.mu);
				handoff_.live_links.erase(l.gen);
			}
			l.closing = true;
			l.receiver.close();
			handoff_.Event(ConsumerEvent::Kind::SessionReleased, l.session_id);
		}
	}
	Publish();
	Fill(now);
}

void
SessionLinks::SetStates() {
	std::vector<SessionStateUpdate> batch;
	{
		std::lock_guard<std::mutex> g(handoff_.mu);
		batch.swap(handoff_.to_set_state);
	}
	std::vector<SessionStateResult> failed;
	for (auto &u : batch) {
		bool held = false;
		for (auto &l : links_)
			held |= l.locked && !l.closing && l.session_id == u.session_id;
		if (!held || !mgmt_.Ready()) {
			failed.push_back(
			    {u.session_id, u.version, false, held ? "$management is not open" : "the session is not held"});
			continue;
		}
		std::map<std::string, proton::value> body;
		body["session-id"] = u.session_id;
		if (u.has_state)
			body["session-state"] = proton::binary(u.state.begin(), u.state.end());
		else
			body["session-state"] = proton::value();
		std::string sid = u.session_id, link;
		int64_t version = u.version;
		for (auto &l : links_)
			if (l.locked && !l.closing && l.session_id == u.session_id)
				link = l.receiver.name();
		mgmt_.Request(
		    "com.microsoft:set-session-state", body,
		    [this, sid, version](int64_t code, const std::string &desc, const proton::value &) {
			    {
				    std::lock_guard<std::mutex> g(handoff_.mu);
				    handoff_.state_results.push_back(
				        {sid, version, code == 200, code == 200 ? "" : std::to_string(code) + " " + desc});
			    }
			    handoff_.Wake();
		    },
		    link);
	}
	if (!failed.empty()) {
		{
			std::lock_guard<std::mutex> g(handoff_.mu);
			handoff_.state_results.insert(handoff_.state_results.end(), failed.begin(), failed.end());
		}
		handoff_.Wake();
	}
}

void
SessionLinks::Reset() {
	{
		std::lock_guard<std::mutex> g(handoff_.mu);
		handoff_.live_links.clear();
		handoff_.status.sessions_held = 0;
	}
	links_.clear();
	fill_at_ = 0;
}

} // namespace sbpg::amqp
